"""Generated images with learnable labels, for tests and smoke runs of any config.

Each class has a smooth random template (low-resolution noise upsampled to the
image size); an example is its class template plus Gaussian noise. A linear
classifier can separate the classes, so a model that trains at all gets well
above chance within a few steps. Everything derives from ``data.seed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import IMAGE_SIZE, DataBundle, in_range, int_at_least, register_dataset
from .transforms import TensorImageDataset, random_hflip, random_shift

__all__ = ["make_synthetic_images", "build_synthetic"]


def _size(v, key: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) and i > 0 for i in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"data.{key} must be a positive int or [height, width], got {v!r}")


def make_synthetic_images(
    n: int,
    num_classes: int,
    size: tuple[int, int],
    channels: int,
    noise: float,
    generator: torch.Generator,
    templates: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (n, C, H, W), labels (n,), templates (classes, C, H, W)); labels balanced, shuffled."""
    if templates is None:
        coarse = torch.randn(num_classes, channels, 4, 4, generator=generator)
        templates = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        templates = templates / templates.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=generator)]
    images = templates[labels] + noise * torch.randn(n, channels, *size, generator=generator)
    return images, labels, templates


@register_dataset(
    "synthetic",
    defaults={
        "num_train": 512,
        "num_val": 128,
        "num_test": 0,
        "num_classes": 10,
        "image_size": 32,
        "channels": 3,
        "noise": 1.0,
        "augment": "none",
    },
    choices={"augment": ("none", "light")},
    checks={
        "num_train": int_at_least(1),
        "num_val": int_at_least(1),
        "num_test": int_at_least(0),
        "num_classes": int_at_least(2),
        "channels": int_at_least(1),
        "image_size": IMAGE_SIZE,
        "noise": in_range(0, float("inf"), lo_closed=True),
    },
)
def build_synthetic(cfg: dict, seed: int) -> DataBundle:
    size = _size(cfg["image_size"], "image_size")
    noise = float(cfg["noise"])
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    args = (cfg["num_classes"], size, cfg["channels"], noise, g)
    train_x, train_y, templates = make_synthetic_images(cfg["num_train"], *args)
    val_x, val_y, _ = make_synthetic_images(cfg["num_val"], *args, templates=templates)
    augment = None
    if cfg["augment"] == "light":
        pad = max(1, min(size) // 8)

        def augment(x: torch.Tensor) -> torch.Tensor:
            return random_hflip(random_shift(x, pad))

    img_size = size[0] if size[0] == size[1] else list(size)
    test = None
    if cfg["num_test"] > 0:
        test_x, test_y, _ = make_synthetic_images(cfg["num_test"], *args, templates=templates)
        test = TensorImageDataset(test_x, test_y)
    return DataBundle(
        train=TensorImageDataset(train_x, train_y, augment=augment),
        val=TensorImageDataset(val_x, val_y),
        test=test,
        num_classes=cfg["num_classes"],
        model_overrides={
            "img_size": img_size,
            "in_chans": cfg["channels"],
            "num_classes": cfg["num_classes"],
        },
        info={
            "dataset": "synthetic",
            "train": cfg["num_train"],
            "val": cfg["num_val"],
            "image_size": img_size,
        },
    )
