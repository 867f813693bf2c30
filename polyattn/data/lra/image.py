"""Image (LRA): CIFAR-10 in grayscale as a sequence of 1,024 pixel tokens (values 0-255).

Read from the CIFAR-10 python-pickle release with ``polyattn.data.cifar``.
Grayscale as LRA computes it (TensorFlow's rgb_to_grayscale on uint8:
weights 0.2989 / 0.5870 / 0.1140 on [0, 1] values, back to uint8 by
truncating value * 255.5). Splits as LRA: the first 90% of the training set
trains (45,000), the last 10% validates (5,000), the test set tests (10,000).
"""

from __future__ import annotations

import numpy as np
import torch

from ..cifar import load_cifar_arrays
from ..errors import DatasetError
from ..registry import DataBundle, in_range, register_dataset
from .common import FixedLengthDataset, lra_bundle

__all__ = ["grayscale_tokens", "load_cifar_gray"]

_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)


def grayscale_tokens(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 RGB images (N, 3, H, W) -> uint8 gray pixel sequences (N, H*W), row-major."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    gray = np.tensordot(_WEIGHTS, x, axes=([0], [1]))  # (N, H, W)
    gray = np.clip(gray * 255.5, 0, 255).astype(np.uint8)
    return gray.reshape(len(gray), -1)


def load_cifar_gray(root, train_fraction: float = 0.9) -> dict[str, FixedLengthDataset]:
    """LRA's CIFAR-10 splits as pixel-token datasets."""
    arrays = load_cifar_arrays(root, "cifar10")
    train_x = grayscale_tokens(arrays.train_x.numpy())
    train_y = arrays.train_y.numpy()
    cut = int(round(train_fraction * len(train_y)))
    if not 0 < cut < len(train_y):
        raise DatasetError(
            f"data.train_fraction={train_fraction!r} of the {len(train_y)} CIFAR-10 training images leaves the "
            f"{'training' if cut <= 0 else 'validation'} split empty; use a fraction in (0, 1) such as 0.9"
        )
    return {
        "train": FixedLengthDataset(train_x[:cut], train_y[:cut]),
        "val": FixedLengthDataset(train_x[cut:], train_y[cut:]),
        "test": FixedLengthDataset(grayscale_tokens(arrays.test_x.numpy()), arrays.test_y.numpy()),
    }


@register_dataset("lra_image", {"train_fraction": 0.9}, checks={"train_fraction": in_range(0, 1)})
def build_lra_image(cfg: dict, seed: int) -> DataBundle:
    frac = float(cfg["train_fraction"])
    splits = load_cifar_gray(cfg["root"], frac)
    return lra_bundle("lra_image", str(cfg["root"]), splits, 10, 256, 1024)
