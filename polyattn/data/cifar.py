"""CIFAR-10 / CIFAR-100 from the official python-pickle release.

CIFAR has no separate validation set: with ``data.val_fraction: 0`` (default)
the official test set is the validation set; with a fraction > 0 a stratified
part of the training set (``data.seed``) validates and the test set is kept
as ``test``. ``augment: light`` = random shift by up to 4 pixels + horizontal flip.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetError, DatasetFormatError, DatasetNotFoundError, root_path
from .registry import IMAGE_SIZE, DataBundle, in_range, register_dataset
from .transforms import TensorImageDataset, random_hflip, random_shift, stratified_split

__all__ = ["CIFAR10_LAYOUT", "CIFAR100_LAYOUT", "CifarArrays", "load_cifar_arrays"]

CIFAR10_LAYOUT = """\
ROOT/cifar-10-batches-py/   (ROOT may also be this folder itself)
  data_batch_1 ... data_batch_5   pickles: {b'data': uint8 (10000, 3072), b'labels': [int]}
  test_batch
  batches.meta                    pickle: {b'label_names': [...]}
"""

CIFAR100_LAYOUT = """\
ROOT/cifar-100-python/      (ROOT may also be this folder itself)
  train                      pickle: {b'data': uint8 (50000, 3072), b'fine_labels': [int], ...}
  test
  meta                       pickle: {b'fine_label_names': [...], ...}
"""

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

_VARIANTS = {
    # variant: (folder, layout, train files, test files, meta file, label key, names key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        CIFAR10_LAYOUT,
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "labels",
        "label_names",
        10,
    ),
    "cifar100": (
        "cifar-100-python",
        CIFAR100_LAYOUT,
        ["train"],
        ["test"],
        "meta",
        "fine_labels",
        "fine_label_names",
        100,
    ),
}


@dataclass
class CifarArrays:
    """A CIFAR release in memory: uint8 images (N, 3, 32, 32), long labels, class names."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]


def _get(d: dict, key: str):
    # The release pickles were written by Python 2: keys load as bytes.
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _unpickle(path: Path, layout: str) -> dict:
    if not path.is_file():
        raise DatasetNotFoundError.for_path(path, layout, problem="CIFAR file not found")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:  # a truncated or foreign file can fail in many ways inside pickle
        raise DatasetFormatError.for_path(
            path, layout, problem=f"malformed dataset file (not a readable pickle: {e})"
        ) from None
    if not isinstance(obj, dict):
        raise DatasetFormatError.for_path(
            path, layout, problem=f"malformed dataset file (holds {type(obj).__name__}, expected a dict)"
        )
    return obj


def _batch(path: Path, layout: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path, layout)
    data, labels = _get(d, "data"), _get(d, label_key)
    if data is None or labels is None:
        keys = ", ".join(repr(k) for k in d)
        raise DatasetFormatError.for_path(
            path,
            layout,
            problem=f"malformed dataset file (needs keys b'data' and b'{label_key}', has {keys})",
        )
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DatasetFormatError.for_path(
            path,
            layout,
            problem=f"malformed dataset file (b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape})",
        )
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise DatasetFormatError.for_path(
            path,
            layout,
            problem=f"malformed dataset file ({data.shape[0]} images need {data.shape[0]} labels in "
            f"0..{num_classes - 1})",
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar_arrays(root, variant: str = "cifar10") -> CifarArrays:
    """Read a CIFAR-10 or CIFAR-100 python release into memory, checking its layout."""
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {list(_VARIANTS)}, got {variant!r}")
    folder, layout, train_files, test_files, meta_file, label_key, names_key, k = _VARIANTS[variant]
    path = root_path(root, layout, variant)
    if (path / folder).is_dir():
        path = path / folder
    if not path.is_dir():
        raise DatasetNotFoundError.for_path(path, layout, problem=f"{variant} folder not found")
    meta = _unpickle(path / meta_file, layout)
    names = _get(meta, names_key)
    if names is None or len(names) != k:
        raise DatasetFormatError.for_path(
            path / meta_file, layout, problem=f"malformed dataset file (needs b'{names_key}' with {k} names)"
        )
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_batch(path / f, layout, label_key, k) for f in files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(x), torch.from_numpy(y)

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    return CifarArrays(train_x, train_y, test_x, test_y, classes)


def _light(x: torch.Tensor) -> torch.Tensor:
    return random_hflip(random_shift(x, 4))


def _size(v) -> tuple[int, int] | None:
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return None if v == 32 else (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) and i > 0 for i in v):
        return None if tuple(v) == (32, 32) else (int(v[0]), int(v[1]))
    raise ValueError(f"data.image_size must be a positive int or [height, width], got {v!r}")


def _build(variant: str, cfg: dict) -> DataBundle:
    arrays = load_cifar_arrays(cfg["root"], variant)
    size = _size(cfg["image_size"])
    augment = _light if cfg["augment"] == "light" else None
    frac = float(cfg["val_fraction"])

    def ds(x, y, aug=None):
        return TensorImageDataset(x, y, CIFAR_MEAN, CIFAR_STD, augment=aug, size=size)

    if frac > 0:
        tr_idx, va_idx = stratified_split(arrays.train_y, frac, int(cfg["seed"]))
        if not tr_idx or not va_idx:
            raise DatasetError(
                f"data.val_fraction={frac!r} leaves the {'validation' if not va_idx else 'training'} split of "
                f"{variant} empty (each class gives round(fraction * its count) examples to validation)"
            )
        train = ds(arrays.train_x[tr_idx], arrays.train_y[tr_idx], augment)
        val = ds(arrays.train_x[va_idx], arrays.train_y[va_idx])
        test = ds(arrays.test_x, arrays.test_y)
    else:
        train = ds(arrays.train_x, arrays.train_y, augment)
        val, test = ds(arrays.test_x, arrays.test_y), None
    hw = size or (32, 32)
    img_size = hw[0] if hw[0] == hw[1] else list(hw)
    k = len(arrays.classes)
    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=k,
        model_overrides={"img_size": img_size, "in_chans": 3, "num_classes": k},
        info={
            "dataset": variant,
            "root": str(cfg["root"]),
            "train": len(train),
            "val": len(val),
            "test": 0 if test is None else len(test),
            "image_size": img_size,
            "classes": arrays.classes,
        },
    )


_CIFAR_DEFAULTS = {"image_size": 32, "val_fraction": 0.0, "augment": "none"}
_CIFAR_CHOICES = {"augment": ("none", "light")}
# 0 = validate on the test set, so 0 is allowed here (unlike digits).
_CIFAR_CHECKS = {"val_fraction": in_range(0, 1, lo_closed=True), "image_size": IMAGE_SIZE}


@register_dataset("cifar10", _CIFAR_DEFAULTS, _CIFAR_CHOICES, _CIFAR_CHECKS)
def build_cifar10(cfg: dict, seed: int) -> DataBundle:
    return _build("cifar10", cfg)


@register_dataset("cifar100", _CIFAR_DEFAULTS, _CIFAR_CHOICES, _CIFAR_CHECKS)
def build_cifar100(cfg: dict, seed: int) -> DataBundle:
    return _build("cifar100", cfg)
