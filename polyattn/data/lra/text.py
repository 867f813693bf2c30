"""Text (LRA): byte-level IMDB sentiment, from the standard aclImdb folders.

Each review is its raw UTF-8 bytes, byte b -> token b + 1 (0 = padding), as
LRA's byte encoder does; the first ``max_len`` bytes are kept (1,000 in LRA,
4,000 in its longer variant). IMDB has no validation split: LRA validates on
the test set, which is the default here too (``data.val_fraction: 0``); a
fraction > 0 holds out that share of the training reviews instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import DatasetError, DatasetFormatError, DatasetNotFoundError
from ..registry import DataBundle, in_range, int_at_least, register_dataset
from .common import SequenceDataset, TokenStore, bar_disabled, lra_bundle, split_indices

__all__ = ["IMDB_LAYOUT", "read_imdb_split", "load_imdb"]

IMDB_LAYOUT = """\
ROOT/aclImdb/   (ROOT may also be this folder itself)
  train/pos/<id>_<rating>.txt   one review per file (rating 7-10)
  train/neg/<id>_<rating>.txt   (rating 1-4)
  test/pos/  test/neg/
"""
_HINT = "download and unpack aclImdb_v1.tar.gz (Maas et al. 2011), then set --data DIR / data.root=DIR"
_NAME = re.compile(r"^(\d+)_(\d+)\.txt$")


def _root(root) -> Path:
    if root is None or str(root) == "":
        raise DatasetNotFoundError.for_path(
            None, IMDB_LAYOUT, _HINT, problem="data.root is not set (the LRA Text task reads IMDB from disk)"
        )
    path = Path(os.path.expanduser(str(root)))
    if (path / "aclImdb").is_dir():
        path = path / "aclImdb"
    if not path.is_dir():
        raise DatasetNotFoundError.for_path(path, IMDB_LAYOUT, _HINT, problem="IMDB folder not found")
    for split in ("train", "test"):
        for label in ("pos", "neg"):
            if not (path / split / label).is_dir():
                raise DatasetNotFoundError.for_path(
                    path / split / label, IMDB_LAYOUT, _HINT, problem="IMDB folder not found"
                )
    return path


def read_imdb_split(folder: Path, max_len: int, progress: bool | None = None) -> tuple[TokenStore, np.ndarray]:
    """Reviews of folder/pos and folder/neg (label 1 / 0) in file-id order, truncated to max_len bytes."""
    files = []
    for label, name in ((0, "neg"), (1, "pos")):
        for p in (folder / name).iterdir():
            m = _NAME.match(p.name)
            if m:
                files.append((label, int(m.group(1)), p))
    files.sort(key=lambda t: (t[0], t[1]))
    if not files:
        raise DatasetNotFoundError.for_path(folder, IMDB_LAYOUT, _HINT, problem="no <id>_<rating>.txt reviews in")
    seqs, labels = [], []
    for label, _, p in tqdm(
        files, desc=f"imdb {folder.name}", unit="file", disable=bar_disabled(progress), leave=False
    ):
        with open(p, "rb") as f:
            seq = np.frombuffer(f.read(max_len), dtype=np.uint8)
        if not seq.size:
            # An empty review is an all-padding sequence: a label with nothing to learn it from.
            raise DatasetFormatError.for_path(
                p, IMDB_LAYOUT, f"delete the file or restore it from aclImdb_v1.tar.gz; {_HINT}", problem="empty review"
            )
        seqs.append(seq)
        labels.append(label)
    return TokenStore.from_sequences(seqs), np.asarray(labels, dtype=np.int64)


def load_imdb(
    root, max_len: int = 1000, val_fraction: float = 0.0, seed: int = 0, progress: bool | None = None
) -> dict:
    """{"train", "val", "test" (None when val is the test set)} byte-token datasets."""
    path = _root(root)
    train_store, train_y = read_imdb_split(path / "train", max_len, progress)
    test_store, test_y = read_imdb_split(path / "test", max_len, progress)
    test = SequenceDataset(test_store, test_y, max_len, shift=1)
    if val_fraction <= 0:
        return {"train": SequenceDataset(train_store, train_y, max_len, shift=1), "val": test, "test": None}
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
    tr, va = split_indices(len(train_y), (1 - val_fraction, val_fraction), seed)
    if not len(tr) or not len(va):
        raise DatasetError(
            f"data.val_fraction={val_fraction!r} of the {len(train_y)} training reviews in {path / 'train'} "
            f"leaves the {'validation' if not len(va) else 'training'} split empty; use a smaller fraction, "
            "or 0 to validate on the test set"
        )
    return {
        "train": SequenceDataset(train_store.subset(tr), train_y[tr], max_len, shift=1),
        "val": SequenceDataset(train_store.subset(va), train_y[va], max_len, shift=1),
        "test": test,
    }


@register_dataset(
    "lra_text",
    {"max_len": 1000, "val_fraction": 0.0},
    checks={"max_len": int_at_least(1), "val_fraction": in_range(0, 1, lo_closed=True)},
)
def build_lra_text(cfg: dict, seed: int) -> DataBundle:
    frac = float(cfg["val_fraction"])
    max_len = int(cfg["max_len"])
    splits = load_imdb(cfg["root"], max_len, frac, int(cfg["seed"]))
    return lra_bundle("lra_text", str(cfg["root"]), splits, 2, 257, max_len)
