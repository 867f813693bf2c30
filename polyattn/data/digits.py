"""scikit-learn's bundled 8x8 digits: 1,797 grey images of 0-9, no download needed.

A fixed stratified split (``data.seed``, ``data.val_fraction``) gives train and
validation sets; pixels (0-16) are scaled to [0, 1] and standardised with the
training split's mean and std. ``augment: light`` shifts each image by up to one
pixel (no flips: a mirrored digit is another symbol).
"""

from __future__ import annotations

import torch

from .errors import DatasetError
from .registry import DataBundle, in_range, register_dataset
from .transforms import TensorImageDataset, random_shift, stratified_split

__all__ = ["load_digits_tensors", "build_digits"]


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float images (N, 1, 8, 8) in [0, 1] and long labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.as_tensor(d.target, dtype=torch.long)


def _shift_one(x: torch.Tensor) -> torch.Tensor:
    return random_shift(x, 1)


@register_dataset(
    "digits",
    defaults={"val_fraction": 0.2, "augment": "none"},
    choices={"augment": ("none", "light")},
    checks={"val_fraction": in_range(0, 1)},
)
def build_digits(cfg: dict, seed: int) -> DataBundle:
    images, labels = load_digits_tensors()
    frac = float(cfg["val_fraction"])
    train_idx, val_idx = stratified_split(labels, frac, int(cfg["seed"]))
    if not train_idx or not val_idx:
        # Each class gives round(fraction * count) examples (about 180 per class), so a
        # fraction within 1/360 of 0 or 1 leaves one side empty.
        raise DatasetError(
            f"data.val_fraction={frac!r} leaves the {'validation' if not val_idx else 'training'} split of "
            "digits empty; use a fraction between about 0.01 and 0.99"
        )
    train_x = images[train_idx]
    mean, std = train_x.mean().item(), train_x.std().item()
    augment = _shift_one if cfg["augment"] == "light" else None
    train = TensorImageDataset(train_x, labels[train_idx], mean, std, augment=augment)
    val = TensorImageDataset(images[val_idx], labels[val_idx], mean, std)
    return DataBundle(
        train=train,
        val=val,
        test=None,
        num_classes=10,
        model_overrides={"img_size": 8, "in_chans": 1, "num_classes": 10},
        info={"dataset": "digits", "train": len(train), "val": len(val), "image_size": 8, "channels": 1},
    )
