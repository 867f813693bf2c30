"""Image transforms on tensors and PIL images, driven by torch's RNG.

Augmentations draw from torch's global generator (or the DataLoader worker's),
which the trainer seeds and checkpoints, so an augmented run resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TensorImageDataset",
    "random_shift",
    "random_hflip",
    "stratified_split",
    "pil_to_tensor",
    "resize_shorter",
    "center_crop",
    "random_resized_crop",
    "timm_train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TensorTransform = Callable[[torch.Tensor], torch.Tensor]


# --- tensor augmentations (C, H, W) ---------------------------------------
def random_shift(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad by ``pad`` pixels and crop back at a random offset (a random translation)."""
    if pad <= 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    i, j = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
    return padded[..., i : i + h, j : j + w]


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1) if bool(torch.rand(()) < 0.5) else x


def stratified_split(labels: Sequence[int] | torch.Tensor, val_fraction: float, seed: int) -> tuple[list, list]:
    """Indices (train, val): each class contributes round(val_fraction * count) examples to val."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(int(seed))
    train_idx: list[int] = []
    val_idx: list[int] = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        n_val = int(round(val_fraction * len(idx)))
        val_idx += idx[:n_val]
        train_idx += idx[n_val:]
    return sorted(train_idx), sorted(val_idx)


class TensorImageDataset(Dataset):
    """In-memory images (N, C, H, W) (uint8 0-255 or float) with labels.

    Item: augment (on [0, 1] pixels) -> optional resize -> normalise with mean/std.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float] | float = 0.0,
        std: Sequence[float] | float = 1.0,
        augment: TensorTransform | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        if images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"images must be (N, C, H, W) with N labels, got {tuple(images.shape)} and {len(labels)}")
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        c = images.shape[1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1).expand(c, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1).expand(c, 1, 1)
        self.augment = augment
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.augment is not None:
            x = self.augment(x)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
        return (x - self.mean) / self.std, self.labels[i]


# --- PIL transforms ---------------------------------------------------------
def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    w, h = img.size
    th, tw = size
    if (h, w) == (th, tw):
        return img
    left, top = max(0, round((w - tw) / 2)), max(0, round((h - th) / 2))
    return img.crop((left, top, left + tw, top + th))


def random_resized_crop(
    img: Image.Image, size: tuple[int, int], scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> Image.Image:
    """Inception-style crop: random area fraction and aspect ratio, resized to ``size``."""
    w, h = img.size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(scale[0], scale[1]))
        aspect = math.exp(float(torch.empty(()).uniform_(log_ratio[0], log_ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, ()))
            left = int(torch.randint(0, w - cw + 1, ()))
            return img.crop((left, top, left + cw, top + ch)).resize((size[1], size[0]), Image.BICUBIC)
    side = min(w, h)  # fallback: the central square
    return center_crop(img, (side, side)).resize((size[1], size[0]), Image.BICUBIC)


# --- timm's training pipeline (optional extra) --------------------------------
def timm_train_transform(
    size: tuple[int, int],
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
):
    """timm's ImageNet training transform (PIL image -> normalised tensor): random-resized crop
    (bicubic), flip, ``auto_augment`` (e.g. RandAugment ``rand-m9-mstd0.5-inc1``; None: colour
    jitter 0.4 instead, as timm does) and random erasing with probability ``re_prob`` in ``pixel``
    mode (per-pixel normal noise, as DeiT, Swin and XCiT train). Needs ``pip install polyattn[timm]``.

    RandAugment draws from python's ``random`` and numpy's global RNG, random erasing from torch's
    and python's: the trainer checkpoints all three (and seeds numpy in DataLoader workers).
    """
    from .errors import DatasetError

    try:
        from timm.data import create_transform
    except ImportError as e:
        raise DatasetError(f"data.augment=timm needs timm: pip install polyattn[timm] ({e})") from None
    h, w = size
    return create_transform(
        (3, h, w),
        is_training=True,
        auto_augment=auto_augment,
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
        interpolation="bicubic",
        mean=tuple(mean),
        std=tuple(std),
    )
