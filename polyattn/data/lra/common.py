"""Pieces shared by the Long Range Arena tasks: token storage, datasets, the generated-data cache.

Sequences are kept as one flat array plus offsets (ListOps alone is about
10^8 tokens), and each item is padded to the task's fixed length when it is
read, so the default DataLoader collate stacks them. Items are dicts:

    {"tokens": long (L,), "padding_mask": bool (L,) True = padding}             one sequence
    {"tokens1", "padding_mask1", "tokens2", "padding_mask2"}                      a document pair
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..registry import DataBundle

__all__ = [
    "bar_disabled",
    "TokenStore",
    "SequenceDataset",
    "PairDataset",
    "FixedLengthDataset",
    "cache_root",
    "cached_dir",
    "majority_fraction",
    "split_indices",
]


class TokenStore:
    """Variable-length token sequences in one flat array: ``store[i]`` is sequence i (a numpy view)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(flat):
            raise ValueError("offsets must start at 0 and end at len(flat)")
        self.flat = flat
        self.offsets = offsets.astype(np.int64, copy=False)

    @classmethod
    def from_sequences(cls, seqs: Sequence[np.ndarray] | Iterator[np.ndarray], dtype=np.uint8) -> TokenStore:
        parts = [np.asarray(s, dtype=dtype) for s in seqs]
        lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        return cls(flat.astype(dtype, copy=False), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TokenStore:
        return TokenStore.from_sequences([self[int(i)] for i in indices], dtype=self.flat.dtype)


def _padded(seq: np.ndarray, max_len: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, padding_mask) of length max_len: seq (truncated) + shift, then zeros (= padding)."""
    n = min(len(seq), max_len)
    tokens = torch.zeros(max_len, dtype=torch.long)
    tokens[:n] = torch.from_numpy(seq[:n].astype(np.int64)) + shift
    mask = torch.ones(max_len, dtype=torch.bool)
    mask[:n] = False
    return tokens, mask


class SequenceDataset(Dataset):
    """One token sequence per example, right-padded to ``max_len`` (token id 0 = padding).

    ``shift`` is added to the stored values, e.g. 1 for raw bytes so that id 0
    stays free for padding (the LRA byte encoding).
    """

    def __init__(self, store: TokenStore, labels: np.ndarray, max_len: int, shift: int = 0) -> None:
        if len(store) != len(labels):
            raise ValueError(f"{len(store)} sequences but {len(labels)} labels")
        self.store, self.labels = store, torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.max_len, self.shift = int(max_len), int(shift)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int):
        tokens, mask = _padded(self.store[i], self.max_len, self.shift)
        return {"tokens": tokens, "padding_mask": mask}, self.labels[i]


class PairDataset(Dataset):
    """Two token sequences per example (a document pair), each right-padded to ``max_len``."""

    def __init__(self, first: TokenStore, second: TokenStore, labels: np.ndarray, max_len: int, shift: int = 0) -> None:
        if not len(first) == len(second) == len(labels):
            raise ValueError(f"{len(first)} / {len(second)} documents but {len(labels)} labels")
        self.first, self.second = first, second
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.max_len, self.shift = int(max_len), int(shift)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        t1, m1 = _padded(self.first[i], self.max_len, self.shift)
        t2, m2 = _padded(self.second[i], self.max_len, self.shift)
        return {"tokens1": t1, "padding_mask1": m1, "tokens2": t2, "padding_mask2": m2}, self.labels[i]


class FixedLengthDataset(Dataset):
    """Equal-length token rows (N, L) (pixels as tokens): no padding, so no mask."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray) -> None:
        if tokens.ndim != 2 or len(tokens) != len(labels):
            raise ValueError(f"tokens must be (N, L) with N = {len(labels)} labels, got {tokens.shape}")
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens))
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {"tokens": self.tokens[i].long()}, self.labels[i]


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a progress flag; None lets tqdm decide (no bar when not on a terminal)."""
    return None if progress is None else not progress


def majority_fraction(labels: np.ndarray | torch.Tensor) -> float:
    """Accuracy of always predicting the most common label (the baseline to beat)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return 0.0
    return float(np.bincount(labels).max() / labels.size)


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """A seeded permutation of range(n) cut into consecutive parts of the given fractions."""
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.floor(np.cumsum(fractions)[:-1] * n).astype(int)
    return np.split(perm, cuts)


# --- the cache of generated data --------------------------------------------------
def cache_root() -> Path:
    """$POLYATTN_CACHE, else ~/.cache/polyattn: where generated datasets are kept and reused."""
    env = os.environ.get("POLYATTN_CACHE")
    return Path(os.path.expanduser(env)) if env else Path.home() / ".cache" / "polyattn"


def _key(params: dict) -> str:
    text = json.dumps(params, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An inter-process lock (released by the OS if the holder dies), so that the
    processes of one torchrun job generate the data once and the others wait."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking; generation is deterministic anyway
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_dir(task: str, params: dict, generate: Callable[[Path], None], log: bool = True) -> Path:
    """The cache folder of ``task`` generated with ``params``; ``generate(tmp_dir)`` fills it on first use.

    The folder appears complete or not at all (generated into a temporary
    folder, then renamed), and ``params.json`` in it says what it holds.
    """
    final = cache_root() / "lra" / task / _key(params)
    if (final / "params.json").is_file():
        return final
    with _exclusive(final.parent / f".{final.name}.lock"):
        if (final / "params.json").is_file():  # another process generated it while we waited
            return final
        tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if log:
            print(f"generating {task} data into {final} (first use of these settings; reused later)", file=sys.stderr)
        try:
            generate(tmp)
            (tmp / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def lra_bundle(
    dataset: str,
    source: str,
    splits: dict[str, Dataset | None],
    num_classes: int,
    vocab_size: int,
    max_len: int,
    pair: bool = False,
    **info,
) -> DataBundle:
    """The DataBundle of an LRA task: its splits, the encoder's sizes, and the info every task reports.

    A missing test split (Text with a held-out validation split) is reported as ``val_is_test``, and
    the majority-class accuracy is then that of the validation split.
    """
    test = splits["test"]
    evaluation = test if test is not None else splits["val"]
    return DataBundle(
        train=splits["train"],
        val=splits["val"],
        test=test,
        num_classes=num_classes,
        model_overrides={"vocab_size": vocab_size, "max_len": max_len, "num_classes": num_classes, "pair": pair},
        info={
            "dataset": dataset,
            "source": source,
            "train": len(splits["train"]),
            "val": len(splits["val"]),
            "test": 0 if test is None else len(test),
            **({"val_is_test": True} if test is None else {}),
            "max_len": max_len,
            **info,
            "majority_test_acc": majority_fraction(evaluation.labels.numpy()),
        },
    )
