"""Image datasets read from disk: Tiny-ImageNet, ImageNet and generic class folders.

Images are decoded with PIL when an item is read. Evaluation: resize the
shorter side to ``image_size / crop_pct`` and take the central crop. Training
augmentation (``data.augment``): ``none``; ``light`` = random shift (zero padding)
and horizontal flip; ``crop`` = Inception-style random-resized crop and flip;
``timm`` = timm's training pipeline (``timm.data.create_transform``: random-resized
crop, flip, ``data.auto_augment`` e.g. RandAugment ``rand-m9-mstd0.5-inc1``, random
erasing with probability ``data.re_prob``), which needs ``pip install polyattn[timm]``.
The evaluation transform is the same for every choice (it is timm's eval transform:
bicubic resize by crop_pct, then the central crop).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .errors import DatasetFormatError, DatasetNotFoundError, root_path
from .registry import IMAGE_SIZE, DataBundle, in_range, register_dataset
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop,
    pil_to_tensor,
    random_hflip,
    random_resized_crop,
    random_shift,
    resize_shorter,
    timm_train_transform,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "TINY_IMAGENET_LAYOUT",
    "CLASS_FOLDER_LAYOUT",
    "ImageFileDataset",
    "ImageTransform",
    "find_tiny_imagenet",
    "find_class_folders",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")

TINY_IMAGENET_LAYOUT = """\
ROOT/                       (the unpacked tiny-imagenet-200 folder, or its parent)
  wnids.txt                 one class id (WordNet id) per line, e.g. n01443537
  train/<wnid>/images/*.JPEG
  val/images/*.JPEG
  val/val_annotations.txt   <file name> TAB <wnid> TAB x0 TAB y0 TAB x1 TAB y1, one line per val image
"""

CLASS_FOLDER_LAYOUT = """\
ROOT/
  train/<class>/*.JPEG      one folder per class (ImageNet: n01440764, ...); .jpg/.png/... also read
  val/<class>/*.JPEG        the same class folder names as train/
"""

AUGMENT_CHOICES = ("none", "light", "crop", "timm")


def _size(v, key: str = "image_size") -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) and i > 0 for i in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"data.{key} must be a positive int or [height, width], got {v!r}")


class ImageTransform:
    """PIL image -> normalised tensor (3, H, W), with the training augmentation when ``train``."""

    def __init__(
        self,
        size: tuple[int, int],
        train: bool,
        augment: str = "none",
        crop_pct: float = 1.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
    ) -> None:
        if augment not in AUGMENT_CHOICES:
            raise ValueError(f"augment must be one of {list(AUGMENT_CHOICES)}, got {augment!r}")
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"data.crop_pct must be in (0, 1], got {crop_pct!r}")
        self.size = size
        self.augment = augment if train else "none"
        self.crop_pct = crop_pct
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        # augment=timm: timm's whole training pipeline (it normalises itself).
        self.timm = timm_train_transform(size, auto_augment, re_prob, mean, std) if self.augment == "timm" else None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.timm is not None:
            return self.timm(img)
        if self.augment == "crop":
            img = random_resized_crop(img, self.size)
        else:
            img = resize_shorter(img, round(min(self.size) / self.crop_pct))
            img = center_crop(img, self.size)
        x = pil_to_tensor(img)
        if self.augment == "light":
            x = random_hflip(random_shift(x, max(1, min(self.size) // 16)))
        return (x - self.mean) / self.std


class ImageFileDataset(Dataset):
    """(path, label) pairs read with PIL and passed through ``transform``."""

    def __init__(self, samples: list[tuple[str, int]], transform: ImageTransform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                x = self.transform(img.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetFormatError.for_path(path, problem=f"cannot read image ({e})") from None
        return x, torch.tensor(label, dtype=torch.long)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.path for e in it if e.is_file() and _is_image(e.name))


def _require_root(root, layout: str, dataset: str) -> Path:
    path = root_path(root, layout, dataset)
    if not path.is_dir():
        raise DatasetNotFoundError.for_path(path, layout, problem=f"{dataset} folder not found")
    return path


# --- Tiny-ImageNet ------------------------------------------------------------
def find_tiny_imagenet(root) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """(class ids, train samples, val samples) of a Tiny-ImageNet folder; checks the layout."""
    path = _require_root(root, TINY_IMAGENET_LAYOUT, "tiny_imagenet")
    if not (path / "wnids.txt").is_file() and (path / "tiny-imagenet-200" / "wnids.txt").is_file():
        path = path / "tiny-imagenet-200"

    def missing(p: Path, what: str):
        return DatasetNotFoundError.for_path(p, TINY_IMAGENET_LAYOUT, problem=f"Tiny-ImageNet {what} not found")

    wnids_file = path / "wnids.txt"
    if not wnids_file.is_file():
        raise missing(wnids_file, "class list")
    wnids = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
    if not wnids:
        raise DatasetFormatError.for_path(
            wnids_file, TINY_IMAGENET_LAYOUT, problem="malformed dataset file (no class ids)"
        )
    if len(set(wnids)) != len(wnids):
        raise DatasetFormatError.for_path(
            wnids_file, TINY_IMAGENET_LAYOUT, problem="malformed dataset file (repeated class ids)"
        )
    index = {w: i for i, w in enumerate(wnids)}

    train: list[tuple[str, int]] = []
    for wnid in wnids:
        folder = path / "train" / wnid / "images"
        if not folder.is_dir():
            raise missing(folder, f"training folder of class {wnid}")
        files = _list_images(folder)
        if not files:
            raise missing(folder, f"training images of class {wnid}")
        train += [(f, index[wnid]) for f in files]

    ann = path / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise missing(ann, "validation annotations")
    val: list[tuple[str, int]] = []
    for n, line in enumerate(ann.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DatasetFormatError.for_path(
                ann,
                TINY_IMAGENET_LAYOUT,
                problem=f"malformed dataset file (line {n}: expected tab-separated "
                f"'<file>\\t<wnid>\\t...', got {line[:80]!r})",
            )
        fname, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DatasetFormatError.for_path(
                ann,
                TINY_IMAGENET_LAYOUT,
                problem=f"malformed dataset file (line {n}: class {wnid!r} is not in wnids.txt)",
            )
        img = path / "val" / "images" / fname
        if not img.is_file():
            raise missing(img, f"validation image listed on line {n} of val_annotations.txt")
        val.append((str(img), index[wnid]))
    if not val:
        raise DatasetFormatError.for_path(ann, TINY_IMAGENET_LAYOUT, problem="malformed dataset file (no annotations)")
    return wnids, train, val


# --- class folders (ImageNet) -------------------------------------------------
def find_class_folders(
    root, dataset: str = "image_folder"
) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """(class names, train samples, val samples) of a train/<class>/, val/<class>/ folder tree."""
    path = _require_root(root, CLASS_FOLDER_LAYOUT, dataset)
    splits = {}
    for split in ("train", "val"):
        folder = path / split
        if not folder.is_dir():
            raise DatasetNotFoundError.for_path(folder, CLASS_FOLDER_LAYOUT, problem=f"{split}/ folder not found")
        with os.scandir(folder) as it:
            splits[split] = sorted(e.name for e in it if e.is_dir())
        if not splits[split]:
            raise DatasetNotFoundError.for_path(folder, CLASS_FOLDER_LAYOUT, problem=f"no class folders in {split}/")
    classes = splits["train"]
    extra = sorted(set(splits["val"]) - set(classes))
    if extra:
        raise DatasetFormatError.for_path(
            path / "val",
            CLASS_FOLDER_LAYOUT,
            problem=f"malformed dataset (val/ has class folders missing from train/: {', '.join(extra[:5])})",
        )
    index = {c: i for i, c in enumerate(classes)}
    samples: dict[str, list[tuple[str, int]]] = {}
    for split in ("train", "val"):
        samples[split] = []
        for c in splits[split]:
            samples[split] += [(f, index[c]) for f in _list_images(path / split / c)]
        if not samples[split]:
            raise DatasetNotFoundError.for_path(path / split, CLASS_FOLDER_LAYOUT, problem=f"no images in {split}/")
    return classes, samples["train"], samples["val"]


def _bundle(name: str, cfg: dict, classes: list[str], train, val) -> DataBundle:
    size = _size(cfg["image_size"])
    crop_pct = float(cfg["crop_pct"])
    auto_augment = cfg.get("auto_augment")
    if auto_augment is not None and not isinstance(auto_augment, str):
        raise ValueError(f"data.auto_augment must be a timm policy string or null, got {auto_augment!r}")
    if cfg["augment"] != "timm" and (auto_augment or cfg.get("re_prob", 0.0)):
        raise ValueError("data.auto_augment and data.re_prob apply to data.augment=timm only")
    transform = ImageTransform(
        size, True, cfg["augment"], crop_pct, auto_augment=auto_augment, re_prob=float(cfg.get("re_prob", 0.0))
    )
    tr = ImageFileDataset(train, transform)
    va = ImageFileDataset(val, ImageTransform(size, False, "none", crop_pct))
    img_size = size[0] if size[0] == size[1] else list(size)
    return DataBundle(
        train=tr,
        val=va,
        test=None,
        num_classes=len(classes),
        model_overrides={"img_size": img_size, "in_chans": 3, "num_classes": len(classes)},
        info={
            "dataset": name,
            "root": str(cfg["root"]),
            "classes": len(classes),
            "train": len(tr),
            "val": len(va),
            "image_size": img_size,
        },
    )


_IMAGE_CHOICES = {"augment": AUGMENT_CHOICES}
# Checked before the (possibly long) scan of the image folders.
_IMAGE_CHECKS = {
    "image_size": IMAGE_SIZE,
    "crop_pct": in_range(0, 1, hi_closed=True),
    "re_prob": in_range(0, 1, lo_closed=True, hi_closed=True),
}
# auto_augment: a timm policy string (e.g. "rand-m9-mstd0.5-inc1"); it and re_prob apply to augment=timm.
_TIMM_KEYS = {"auto_augment": None, "re_prob": 0.0}


@register_dataset(
    "tiny_imagenet", {"image_size": 64, "crop_pct": 1.0, "augment": "none", **_TIMM_KEYS}, _IMAGE_CHOICES, _IMAGE_CHECKS
)
def build_tiny_imagenet(cfg: dict, seed: int) -> DataBundle:
    classes, train, val = find_tiny_imagenet(cfg["root"])
    return _bundle("tiny_imagenet", cfg, classes, train, val)


@register_dataset(
    "imagenet", {"image_size": 224, "crop_pct": 0.875, "augment": "none", **_TIMM_KEYS}, _IMAGE_CHOICES, _IMAGE_CHECKS
)
def build_imagenet(cfg: dict, seed: int) -> DataBundle:
    classes, train, val = find_class_folders(cfg["root"], "imagenet")
    return _bundle("imagenet", cfg, classes, train, val)


@register_dataset(
    "image_folder",
    {"image_size": 224, "crop_pct": 0.875, "augment": "none", **_TIMM_KEYS},
    _IMAGE_CHOICES,
    _IMAGE_CHECKS,
)
def build_image_folder(cfg: dict, seed: int) -> DataBundle:
    classes, train, val = find_class_folders(cfg["root"], "image_folder")
    return _bundle("image_folder", cfg, classes, train, val)
