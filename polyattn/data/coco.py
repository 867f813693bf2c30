"""COCO instance segmentation data for Mask R-CNN: the reader, its transforms and a synthetic generator.

``CocoDetection(root, split)`` reads the layout of the COCO 2017 release and
returns ``(image, target)`` pairs in the form torchvision's Mask R-CNN trains
on; ``generate_coco_shapes`` writes a small data set of coloured squares,
circles and triangles in that same layout (``polyattn data coco-shapes``), so
the whole pipeline runs, and is tested, without the 20 GB download.

    ROOT/annotations/instances_{train,val}2017.json
    ROOT/{train,val}2017/<file_name>

pycocotools is an optional dependency (``pip install 'polyattn[detect]'``):
nothing under ``polyattn`` imports this module on ``import polyattn``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import DatasetFormatError, DatasetNotFoundError

__all__ = [
    "COCO_LAYOUT",
    "SHAPE_CATEGORIES",
    "CocoDetection",
    "Compose",
    "RandomHorizontalFlip",
    "ResizeShorter",
    "collate_detection",
    "generate_coco_shapes",
]

COCO_LAYOUT = """\
ROOT/
  annotations/instances_train2017.json   COCO instances JSON: "images", "annotations", "categories"
  annotations/instances_val2017.json
  train2017/<file_name>                  the images, named by images[].file_name
  val2017/<file_name>
"""
_GENERATE_HINT = (
    "point root at the folder holding annotations/ and <split>2017/ (the COCO 2017 release), "
    "or generate a small synthetic set with: polyattn data coco-shapes --out DIR"
)
# category id -> name of the generated shapes
SHAPE_CATEGORIES = {1: "square", 2: "circle", 3: "triangle"}

Target = dict[str, Any]
Sample = tuple[torch.Tensor, Target]


def _mask_api():
    """pycocotools.mask, or an ImportError naming the extra that installs it."""
    try:
        from pycocotools import mask
    except ImportError as e:  # pragma: no cover - the test environment has it
        raise ImportError(
            "COCO data needs pycocotools: pip install pycocotools  (or pip install 'polyattn[detect]')"
        ) from e
    return mask


def _coco_index(dataset: dict):
    """A pycocotools COCO index over an already parsed JSON (the file is read once, not twice)."""
    try:
        from pycocotools.coco import COCO
    except ImportError as e:  # pragma: no cover
        raise ImportError(
            "COCO data needs pycocotools: pip install pycocotools  (or pip install 'polyattn[detect]')"
        ) from e
    coco = COCO()
    coco.dataset = dataset
    # createIndex prints progress lines on every construction; a data loader should stay quiet
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# --- reading -------------------------------------------------------------------------------------
class CocoDetection(torch.utils.data.Dataset):
    """COCO instances of one split as ``(image, target)`` for torchvision's Mask R-CNN.

    ``image``: float (3, H, W) in [0, 1]. ``target``: ``boxes`` float (K, 4) xyxy
    in pixels, ``labels`` int64 (K,) in 1..C (0 is the background), ``masks``
    uint8 (K, H, W), ``iscrowd`` int64 (K,), ``area`` float (K,), ``image_id`` int.
    Labels number the category ids in sorted order: ``cat_ids[label - 1]`` and
    ``label_to_cat_id[label]`` give the COCO id back. Annotations with no area
    or a box under one pixel wide or high are left out; crowd annotations are
    kept with ``iscrowd`` 1. Every image is kept, those without annotations too.
    """

    def __init__(
        self, root: str | os.PathLike, split: str, transforms: Callable[[torch.Tensor, Target], Sample] | None = None
    ) -> None:
        self.root = Path(os.path.expanduser(str(root)))
        self.split = split
        self.transforms = transforms
        self.ann_file = self.root / "annotations" / f"instances_{split}2017.json"
        self.image_dir = self.root / f"{split}2017"
        if not self.ann_file.is_file():
            raise DatasetNotFoundError.for_path(
                self.ann_file,
                COCO_LAYOUT,
                _GENERATE_HINT,
                problem=f"COCO annotations file of split {split!r} not found",
            )
        dataset = self._read_json()
        if not self.image_dir.is_dir():
            raise DatasetNotFoundError.for_path(
                self.image_dir,
                COCO_LAYOUT,
                f"the images of {self.ann_file.name} go in {self.image_dir}",
                problem=f"COCO image folder of split {split!r} not found",
            )
        self.coco = _coco_index(dataset)
        self.ids: list[int] = sorted(self.coco.imgs)
        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.cat_id_to_label: dict[int, int] = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id: dict[int, int] = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.classes: list[str] = ["__background__"] + [str(self.coco.cats[c].get("name", c)) for c in self.cat_ids]

    def _format_error(self, problem: str, hint: str | None = None) -> DatasetFormatError:
        return DatasetFormatError.for_path(self.ann_file, COCO_LAYOUT, hint, problem=problem)

    def _read_json(self) -> dict:
        """The parsed annotations file, checked for what the index and ``__getitem__`` rely on."""
        try:
            with open(self.ann_file, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._format_error(
                f"COCO annotations file is not valid JSON ({e})",
                "re-download or regenerate the file; a truncated download is the usual cause",
            ) from None
        if not isinstance(data, dict):
            raise self._format_error(f"COCO annotations file holds a JSON {type(data).__name__}, not an object")
        missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
        if missing:
            raise self._format_error(
                f"COCO annotations file lacks the list(s) {', '.join(repr(k) for k in missing)}",
                "an instances_*.json file holds the lists 'images', 'annotations' and 'categories' "
                "(captions_* and person_keypoints_* files are not instance annotations)",
            )
        for key, fields in (("images", ("id", "file_name")), ("annotations", ("id", "image_id", "category_id"))):
            for j, entry in enumerate(data[key]):
                if not isinstance(entry, dict) or any(f not in entry for f in fields):
                    raise self._format_error(
                        f"COCO annotations file: {key}[{j}] lacks one of the fields {', '.join(fields)}"
                    )
        if any(not isinstance(c, dict) or "id" not in c for c in data["categories"]):
            raise self._format_error("COCO annotations file: a category lacks its 'id'")
        image_ids = {im["id"] for im in data["images"]}
        cat_ids = {c["id"] for c in data["categories"]}
        for ann in data["annotations"]:
            if ann["image_id"] not in image_ids:
                raise self._format_error(
                    f"COCO annotation {ann['id']} refers to image_id {ann['image_id']}, which is not among the images",
                    "add that image to 'images' or remove its annotations",
                )
            if ann["category_id"] not in cat_ids:
                raise self._format_error(
                    f"COCO annotation {ann['id']} has category_id {ann['category_id']}, not among the categories",
                    "add that category to 'categories' or remove its annotations",
                )
        return data

    @property
    def num_classes(self) -> int:
        """Categories plus the background: Mask R-CNN's ``num_classes``."""
        return len(self.cat_ids) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def _load_image(self, info: dict) -> torch.Tensor:
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise DatasetNotFoundError.for_path(
                path,
                COCO_LAYOUT,
                f"{self.ann_file.name} lists it as image {info['id']}; restore the file or remove that image",
                problem="COCO image file not found",
            )
        try:
            with Image.open(path) as im:
                # COCO holds some greyscale (and a few CMYK) JPEGs among the RGB ones
                arr = np.array(im.convert("RGB"), dtype=np.uint8)
        except OSError as e:
            raise DatasetFormatError.for_path(path, COCO_LAYOUT, problem=f"unreadable COCO image ({e})") from None
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)

    def _mask(self, ann: dict, h: int, w: int) -> np.ndarray:
        """The (h, w) uint8 mask of one annotation's polygons or RLE."""
        mask_api = _mask_api()
        seg = ann.get("segmentation")
        if isinstance(seg, list) and all(isinstance(p, list) and all(map(_is_number, p)) for p in seg):
            # fewer than 3 points enclose nothing, and pycocotools reads a 4-number list as a box
            polys = [[float(v) for v in p] for p in seg if len(p) >= 6 and len(p) % 2 == 0]
            if not polys:
                return np.zeros((h, w), dtype=np.uint8)
            rle = mask_api.merge(mask_api.frPyObjects(polys, h, w))
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            counts = seg["counts"]
            if isinstance(counts, list):  # uncompressed RLE (crowd annotations of the release)
                rle = mask_api.frPyObjects(seg, h, w)
            elif isinstance(counts, str | bytes):
                rle = {"size": list(seg["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
            else:
                raise self._unknown_segmentation(ann)
        else:
            raise self._unknown_segmentation(ann)
        with warnings.catch_warnings():
            # pycocotools 2.0.x's decode trips numpy 2's __array__(copy=...) deprecation on every call.
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            mask = mask_api.decode(rle)
        if mask.shape != (h, w):
            raise self._format_error(
                f"COCO annotation {ann['id']}: RLE of size {list(mask.shape)}, its image is {h}x{w}",
                "an RLE's 'size' is [height, width] of its image",
            )
        return mask

    def _unknown_segmentation(self, ann: dict) -> DatasetFormatError:
        seg = repr(ann.get("segmentation"))
        return self._format_error(
            f"COCO annotation {ann['id']} has a segmentation of unknown form: {seg[:80]}",
            "use polygons [[x1, y1, x2, y2, ...], ...] or RLE {'counts': [...] or 'string', 'size': [h, w]}",
        )

    def __getitem__(self, index: int) -> Sample:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = self._load_image(info)
        h, w = image.shape[-2:]
        boxes, labels, masks, crowd, areas = [], [], [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list | tuple) and len(bbox) == 4 and all(map(_is_number, bbox))):
                raise self._format_error(f"COCO annotation {ann['id']} has no 'bbox' [x, y, width, height]: {bbox!r}")
            x, y, bw, bh = (float(v) for v in bbox)
            area = float(ann.get("area", bw * bh))
            if bw < 1 or bh < 1 or area <= 0:
                continue
            # boxes of the release reach past the border by a fraction of a pixel at times
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
            if x2 <= x1 or y2 <= y1:
                continue
            boxes.append((x1, y1, x2, y2))
            labels.append(self.cat_id_to_label[ann["category_id"]])
            masks.append(self._mask(ann, h, w))
            crowd.append(int(bool(ann.get("iscrowd", 0))))
            areas.append(area)
        target: Target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
            "iscrowd": torch.tensor(crowd, dtype=torch.int64),
            "area": torch.tensor(areas, dtype=torch.float32),
            "image_id": int(image_id),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"CocoDetection({str(self.root)!r}, {self.split!r}: {len(self)} images, {self.num_classes - 1} classes)"


def collate_detection(batch: Sequence[Sample]) -> tuple[list[torch.Tensor], list[Target]]:
    """Images and targets as lists: detection images differ in size, so they are not stacked."""
    return [image for image, _ in batch], [target for _, target in batch]


# --- transforms ----------------------------------------------------------------------------------
class Compose:
    """Apply ``(image, target)`` transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor, Target], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> Sample:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class ResizeShorter:
    """Resize so the shorter side is ``short`` and the longer at most ``max_size`` (Mask R-CNN's 800 / 1333).

    A sequence of sides picks one at random per image (multi-scale training).
    Boxes and areas scale with the image; masks use nearest-neighbour sampling,
    so they stay binary.
    """

    def __init__(self, short: int | Sequence[int], max_size: int | None = 1333) -> None:
        self.short = (int(short),) if isinstance(short, int) else tuple(int(s) for s in short)
        if not self.short or min(self.short) < 1:
            raise ValueError(f"short side(s) must be >= 1, got {short!r}")
        if max_size is not None and max_size < max(self.short):
            raise ValueError(f"max_size {max_size} is below the short side {max(self.short)}")
        self.max_size = max_size

    def size_for(self, h: int, w: int, short: int) -> tuple[int, int]:
        """(new_h, new_w) of an h x w image."""
        scale = short / min(h, w)
        if self.max_size is not None and max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))

    def __call__(self, image: torch.Tensor, target: Target) -> Sample:
        short = self.short[int(torch.randint(len(self.short), ())) if len(self.short) > 1 else 0]
        h, w = image.shape[-2:]
        nh, nw = self.size_for(h, w, short)
        if (nh, nw) == (h, w):
            return image, target
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        target = dict(target)
        sx, sy = nw / w, nh / h
        if "boxes" in target:
            target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
        if "area" in target:
            target["area"] = target["area"] * (sx * sy)
        masks = target.get("masks")
        if masks is not None:
            if masks.shape[0]:
                # nearest-exact samples pixel centres, so a resized mask keeps to its scaled box; "nearest" shifts it
                target["masks"] = F.interpolate(masks[None], size=(nh, nw), mode="nearest-exact")[0]
            else:
                target["masks"] = masks.new_zeros((0, nh, nw))
        return image, target

    def __repr__(self) -> str:
        short = self.short[0] if len(self.short) == 1 else self.short
        return f"ResizeShorter({short}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror image, masks and boxes (x1' = W - x2, x2' = W - x1) with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, image: torch.Tensor, target: Target) -> Sample:
        if self.p <= 0 or (self.p < 1 and float(torch.rand(())) >= self.p):
            return image, target
        w = image.shape[-1]
        image = image.flip(-1)
        target = dict(target)
        if "boxes" in target:
            b = target["boxes"]
            target["boxes"] = torch.stack((w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]), dim=1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


# --- the synthetic generator ---------------------------------------------------------------------
def _shape_polygon(kind: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """(n, 2) vertices of a shape of circumradius r: a square and a triangle turned by angle, a circle as a 24-gon."""
    n = {1: 4, 2: 24, 3: 3}[kind]
    t = angle + 2 * math.pi * np.arange(n) / n
    return np.stack((cx + r * np.cos(t), cy + r * np.sin(t)), axis=1)


def _boxes_touch(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Do xyxy boxes a and b overlap or come within a pixel of each other?"""
    return a[0] <= b[2] + 1 and b[0] <= a[2] + 1 and a[1] <= b[3] + 1 and b[1] <= a[3] + 1


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    # a shape close to the background colour would be invisible, and its mask unlearnable
    for _ in range(32):
        c = rng.integers(0, 256, 3)
        if np.abs(c - background).sum() >= 150:
            break
    else:  # the far end of each channel, at least 384 away
        c = np.where(background < 128, 255, 0)
    return int(c[0]), int(c[1]), int(c[2])


def _write_split(
    rng: np.random.Generator,
    image_dir: Path,
    n: int,
    size: tuple[int, int],
    max_shapes: int,
    first_image_id: int,
    first_ann_id: int,
) -> tuple[list[dict], list[dict], int]:
    """Draw n images into image_dir; returns (images, annotations, empty images) of the JSON."""
    mask_api = _mask_api()
    image_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    # a few images without shapes, as COCO has: a detector must learn to predict nothing too
    num_empty = max(1, n // 20) if n > 1 else 0
    empty = set(rng.choice(n, num_empty, replace=False).tolist()) if num_empty else set()
    ann_id = first_ann_id
    for i in range(n):
        image_id = first_image_id + i
        h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
        background = rng.integers(0, 256, 3)
        pixels = np.empty((h, w, 3), dtype=np.uint8)
        pixels[:] = background
        placed: list[tuple[float, float, float, float]] = []
        for _ in range(0 if i in empty else int(rng.integers(1, max_shapes + 1))):
            kind = int(rng.integers(1, 4))
            r = float(rng.uniform(0.08, 0.22)) * min(h, w) + 2.0
            # a few tries at a spot clear of the shapes drawn so far: overlaps would hide parts of the masks
            for _try in range(10):
                cx, cy = float(rng.uniform(r + 1, w - r - 1)), float(rng.uniform(r + 1, h - r - 1))
                poly = np.round(_shape_polygon(kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi))), 2)
                x0, y0 = poly.min(axis=0)
                x1, y1 = poly.max(axis=0)
                box = (float(x0), float(y0), float(x1), float(y1))
                if not any(_boxes_touch(box, b) for b in placed):
                    break
            else:
                continue
            placed.append(box)
            flat = [float(v) for v in poly.reshape(-1)]
            rle = mask_api.merge(mask_api.frPyObjects([flat], h, w))
            # paint pycocotools' own rasterisation of the polygon (not PIL's, which fills the outline too), so the
            # pixels of a shape are exactly its decoded mask
            pixels[mask_api.decode(rle).astype(bool)] = _contrasting_colour(rng, background)
            anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": kind,
                    "segmentation": [flat],
                    "area": float(mask_api.area(rle)),
                    "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)],
                    "iscrowd": 0,
                }
            )
            ann_id += 1
        file_name = f"{image_id:012d}.png"
        # compress_level 1: several times faster than the default at these sizes, files a little larger
        Image.fromarray(pixels, mode="RGB").save(image_dir / file_name, compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
    return images, anns, len(empty)


def generate_coco_shapes(
    out_dir: str | os.PathLike,
    num_train: int = 200,
    num_val: int = 50,
    image_size: int | tuple[int, int] = (64, 128),
    seed: int = 0,
    max_shapes: int = 4,
) -> dict[str, Any]:
    """Write a synthetic instance segmentation set in the COCO 2017 layout; returns a summary.

    Three categories (ids 1 square, 2 circle, 3 triangle), 1 to ``max_shapes``
    non-overlapping shapes of random colours on a random background per image,
    and about one image in twenty with no shapes. ``image_size``: an int gives
    square images of that side, a pair (low, high) draws each image's height
    and width from low..high. Same arguments, same bytes.
    """
    lo, hi = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    if lo < 16 or hi < lo:
        raise ValueError(f"image_size must be >= 16 (and low <= high), got {image_size!r}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    if max_shapes < 1:
        raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
    root = Path(out_dir)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": k, "name": name, "supercategory": "shape"} for k, name in SHAPE_CATEGORIES.items()]
    summary: dict[str, Any] = {"root": str(root), "categories": list(SHAPE_CATEGORIES.values())}
    image_id, ann_id = 1, 1  # ids unique across the splits, as in the release
    for index, (split, n) in enumerate((("train", num_train), ("val", num_val))):
        # one stream per split: the val images do not change with num_train
        rng = np.random.default_rng([seed, index])
        images, anns, num_empty = _write_split(rng, root / f"{split}2017", n, (lo, hi), max_shapes, image_id, ann_id)
        image_id += n
        ann_id += len(anns)
        data = {
            "info": {"description": f"polyattn coco-shapes (seed {seed})", "version": "1.0"},
            "licenses": [],
            "images": images,
            "annotations": anns,
            "categories": categories,
        }
        path = root / "annotations" / f"instances_{split}2017.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)
        summary[split] = {
            "annotations": str(path),
            "images_dir": str(root / f"{split}2017"),
            "num_images": n,
            "num_annotations": len(anns),
            "num_empty": num_empty,
        }
    return summary
