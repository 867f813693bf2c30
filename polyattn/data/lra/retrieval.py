"""Retrieval (LRA): do two ACL Anthology Network papers cite each other? Byte-level document pairs.

Files of the LRA release (lra_release/tsv_data/): tab-separated, no header,
no quoting, five fields per line:

    label <TAB> id1 <TAB> id2 <TAB> text1 <TAB> text2

Each document is its UTF-8 bytes, byte b -> token b + 1 (0 = padding), the
first ``max_len`` (4,000 in LRA) kept. The model is a dual encoder
(``lra_dual_encoder``): both documents through one encoder, pooled vectors
combined as [u, v, u*v, u-v].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import DatasetFormatError, DatasetNotFoundError
from ..registry import DataBundle, int_at_least, register_dataset
from .common import PairDataset, TokenStore, bar_disabled, lra_bundle

__all__ = ["AAN_LAYOUT", "AAN_FILES", "read_aan_tsv", "load_aan"]

AAN_FILES = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}
AAN_LAYOUT = """\
ROOT/   (e.g. lra_release/tsv_data/)
  new_aan_pairs.train.tsv   one pair per line: label<TAB>id1<TAB>id2<TAB>text1<TAB>text2 (no header)
  new_aan_pairs.eval.tsv
  new_aan_pairs.test.tsv
"""
_HINT = "get the LRA release (lra_release.gz, tsv_data/ folder), then set --data DIR / data.root=DIR"
_FIX_HINT = "restore the file from the LRA release (lra_release.gz, tsv_data/ folder)"


def read_aan_tsv(
    path: str | os.PathLike, max_len: int = 4000, limit: int | None = None, progress: bool | None = None
) -> tuple[TokenStore, TokenStore, np.ndarray]:
    """(first documents, second documents, labels) of one AAN pairs file, each truncated to max_len bytes."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError.for_path(path, AAN_LAYOUT, _HINT, problem="AAN pairs file not found")
    first, second, labels = [], [], []
    with open(path, "rb") as f:
        for line_no, line in enumerate(
            tqdm(f, desc=path.name, unit="pair", disable=bar_disabled(progress), leave=False), 1
        ):
            if limit is not None and len(labels) >= limit:
                break
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            fields = line.split(b"\t")
            try:
                if len(fields) != 5:
                    raise ValueError(f"{len(fields)} tab-separated fields, expected 5")
                label = float(fields[0])
                if label not in (0.0, 1.0):
                    raise ValueError(f"label {fields[0].decode(errors='replace')!r} is not 0 or 1")
                for k in (3, 4):
                    if not fields[k].strip():
                        raise ValueError(f"empty text of document {k - 2} (field {k + 1})")
            except ValueError as e:
                raise DatasetFormatError.for_path(
                    path, AAN_LAYOUT, _FIX_HINT, problem=f"malformed AAN pairs file (line {line_no}: {e})"
                ) from None
            first.append(np.frombuffer(fields[3][:max_len], dtype=np.uint8))
            second.append(np.frombuffer(fields[4][:max_len], dtype=np.uint8))
            labels.append(int(label))
    if not labels:
        # An empty split would train 0 steps or score on nothing, and still exit 0.
        what = "no lines were read (limit 0)" if limit == 0 else "no pairs"
        raise DatasetFormatError.for_path(path, AAN_LAYOUT, _FIX_HINT, problem=f"empty AAN pairs file ({what})")
    return TokenStore.from_sequences(first), TokenStore.from_sequences(second), np.asarray(labels, dtype=np.int64)


def load_aan(
    root, max_len: int = 4000, limits: dict | None = None, progress: bool | None = None
) -> dict[str, PairDataset]:
    """The three splits of the AAN matching task as document-pair datasets."""
    if root is None or str(root) == "":
        raise DatasetNotFoundError.for_path(
            None, AAN_LAYOUT, _HINT, problem="data.root is not set (the LRA Retrieval task reads AAN from disk)"
        )
    path = Path(os.path.expanduser(str(root)))
    if not path.is_dir():
        raise DatasetNotFoundError.for_path(path, AAN_LAYOUT, _HINT, problem="AAN folder not found")
    limits = limits or {}
    out = {}
    for split, name in AAN_FILES.items():
        a, b, y = read_aan_tsv(path / name, max_len, limits.get(split), progress)
        out[split] = PairDataset(a, b, y, max_len, shift=1)
    return out


@register_dataset(
    "lra_retrieval",
    {"max_len": 4000, "num_train": 0, "num_val": 0, "num_test": 0},
    checks={"max_len": int_at_least(1), **{f"num_{s}": int_at_least(0) for s in ("train", "val", "test")}},
)
def build_lra_retrieval(cfg: dict, seed: int) -> DataBundle:
    """AAN pairs from ``data.root``; num_* > 0 reads only that many pairs of a split (0 = all)."""
    max_len = int(cfg["max_len"])
    limits = {s: (cfg[f"num_{s}"] or None) for s in AAN_FILES}
    splits = load_aan(cfg["root"], max_len, limits)
    return lra_bundle("lra_retrieval", str(cfg["root"]), splits, 2, 257, max_len, pair=True)
