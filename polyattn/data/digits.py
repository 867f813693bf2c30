"""scikit-learn's bundled 8x8 digits: 1,797 grey images of 0-9, no download needed.

A fixed stratified split (``data.seed``, ``data.val_fraction``) gives train and
validation sets, and ``data.test_fraction > 0`` a held-out test set drawn first;
pixels (0-16) are scaled to [0, 1] and standardised with the training split's
mean and std. ``data.image_size`` (default 8) resizes bilinearly, e.g. 16 for
256 patches of 1 pixel. ``augment: light`` shifts each image by up to one
pixel (no flips: a mirrored digit is another symbol).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetError
from .registry import IMAGE_SIZE, DataBundle, in_range, register_dataset
from .transforms import TensorImageDataset, random_shift, stratified_split

__all__ = ["load_digits_tensors", "build_digits"]


def _bundled_csv() -> Path | None:
    """scikit-learn's digits.csv.gz, found without importing scikit-learn (about a second per process)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float images (N, 1, 8, 8) in [0, 1] and long labels (N,).

    The values of ``sklearn.datasets.load_digits()``, read from its bundled file as it reads it
    (a test keeps the two equal); ``load_digits`` itself where the file is not where it used to be.
    """
    path = _bundled_csv()
    if path is not None:
        data = np.loadtxt(path, delimiter=",")
        images, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        images, target = d.images, d.target
    return torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.as_tensor(target, dtype=torch.long)


def _shift_one(x: torch.Tensor) -> torch.Tensor:
    return random_shift(x, 1)


def _check_fractions(val: float, test: float) -> None:
    if val + test >= 1:
        raise DatasetError(
            f"data.val_fraction ({val}) + data.test_fraction ({test}) must be below 1: nothing would be left "
            "to train on"
        )


@register_dataset(
    "digits",
    defaults={"val_fraction": 0.2, "test_fraction": 0.0, "image_size": 8, "augment": "none"},
    choices={"augment": ("none", "light")},
    checks={"val_fraction": in_range(0, 1), "test_fraction": in_range(0, 1, lo_closed=True), "image_size": IMAGE_SIZE},
)
def build_digits(cfg: dict, seed: int) -> DataBundle:
    images, labels = load_digits_tensors()
    frac, test_frac = float(cfg["val_fraction"]), float(cfg["test_fraction"])
    _check_fractions(frac, test_frac)
    rest = list(range(len(labels)))
    test_idx: list[int] = []
    if test_frac > 0:
        # The test split is drawn first, with its own seed offset, so that changing val_fraction
        # never moves an image into or out of it.
        rest, test_idx = stratified_split(labels, test_frac, int(cfg["seed"]) + 1)
    # val_fraction is a fraction of all images: of what the test split leaves, it is frac / (1 - test_frac).
    train_rel, val_rel = stratified_split(labels[rest], frac / (1 - test_frac), int(cfg["seed"]))
    train_idx, val_idx = [rest[i] for i in train_rel], [rest[i] for i in val_rel]
    if not train_idx or not val_idx or (test_frac > 0 and not test_idx):
        # Each class gives round(fraction * count) examples (about 180 per class), so a
        # fraction within 1/360 of 0 or 1 leaves one side empty.
        empty = "validation" if not val_idx else ("training" if not train_idx else "test")
        raise DatasetError(
            f"data.val_fraction={frac!r}, data.test_fraction={test_frac!r} leave the {empty} split of digits "
            "empty; use fractions between about 0.01 and 0.99"
        )
    size = cfg["image_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    resize = None if size == (8, 8) else size
    train_x = images[train_idx]
    mean, std = train_x.mean().item(), train_x.std().item()
    augment = _shift_one if cfg["augment"] == "light" else None
    train = TensorImageDataset(train_x, labels[train_idx], mean, std, augment=augment, size=resize)
    val = TensorImageDataset(images[val_idx], labels[val_idx], mean, std, size=resize)
    test = TensorImageDataset(images[test_idx], labels[test_idx], mean, std, size=resize) if test_idx else None
    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=10,
        model_overrides={"img_size": list(size) if size[0] != size[1] else size[0], "in_chans": 1, "num_classes": 10},
        info={
            "dataset": "digits",
            "train": len(train),
            "val": len(val),
            "test": len(test) if test is not None else 0,
            "image_size": size[0] if size[0] == size[1] else list(size),
            "channels": 1,
        },
    )
