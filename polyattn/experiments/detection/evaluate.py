"""COCO box and mask AP with pycocotools, and Mask R-CNN outputs as COCO results.

    results = to_coco_results(model(images), image_ids, label_to_cat_id)
    metrics = evaluate_coco("instances_val2017.json", results)
    metrics["bbox"]["AP"], metrics["segm"]["AP"]

The numbers are pycocotools' ``COCOeval`` (the official COCO protocol); this
module only prepares its input, checks it and names its 12 summary stats.
For mask AP the results' ``bbox`` is dropped, as detectron2 does: with a
``bbox`` present, ``COCO.loadRes`` takes the detection's area from the box,
not the mask, which changes the small/medium/large split of APs/APm/APl.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
except ImportError as e:  # pragma: no cover - exercised only without pycocotools
    raise ImportError(f"COCO evaluation needs pycocotools: pip install pycocotools ({e})") from e

__all__ = ["COCO_STATS", "IOU_TYPES", "evaluate_coco", "to_coco_results"]

# The order of COCOeval.stats (COCOeval.summarize) for bbox and segm.
COCO_STATS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")


def _check_predictions(
    predictions: Sequence[Mapping[str, Any]], iou_types: Sequence[str], image_ids: set[int], cat_ids: set[int]
) -> None:
    """Raise ValueError for what pycocotools would assert on, or silently get wrong."""
    needed = {"image_id", "category_id", "score"}
    if "bbox" in iou_types:
        needed.add("bbox")
    if "segm" in iou_types:
        needed.add("segmentation")
    bad_images: set[Any] = set()
    bad_cats: set[Any] = set()
    for i, p in enumerate(predictions):
        if not isinstance(p, Mapping):
            raise ValueError(f"prediction {i} is a {type(p).__name__}, not a COCO result dict")
        missing = needed - p.keys()
        if missing:
            hint = " (segm evaluation needs a 'segmentation' RLE per prediction)" if "segmentation" in missing else ""
            raise ValueError(f"prediction {i} has no {', '.join(sorted(missing))}{hint}: {_short(p)}")
        if p["image_id"] not in image_ids:
            bad_images.add(p["image_id"])
        if p["category_id"] not in cat_ids:
            bad_cats.add(p["category_id"])
    if bad_images:
        raise ValueError(
            f"predictions name image_id(s) not in the ground truth: {sorted(bad_images, key=repr)[:10]} "
            f"({len(image_ids)} ground-truth images)"
        )
    if bad_cats:
        raise ValueError(
            f"predictions name category_id(s) not in the ground truth: {sorted(bad_cats, key=repr)[:10]} "
            f"(ground-truth categories: {sorted(cat_ids)[:20]}); check the label -> category id mapping"
        )


def _short(p: Mapping[str, Any]) -> str:
    return repr({k: v for k, v in p.items() if k != "segmentation"})[:200]


def evaluate_coco(
    gt_json_path: str | Path,
    predictions: Sequence[Mapping[str, Any]],
    iou_types: Iterable[str] = IOU_TYPES,
) -> dict[str, dict[str, float]]:
    """COCO AP/AR of ``predictions`` against the annotations in ``gt_json_path``, per IoU type.

    ``predictions`` are COCO result dicts: ``image_id``, ``category_id``,
    ``score``, ``bbox`` (x, y, w, h) for ``"bbox"`` and ``segmentation`` (an
    RLE, as :func:`to_coco_results` writes) for ``"segm"``. Returns
    ``{iou_type: {stat: value}}`` with the 12 stats of :data:`COCO_STATS`
    (pycocotools' summary, -1.0 where the ground truth has nothing to score,
    e.g. APs without small objects). No predictions score 0.0 everywhere.
    pycocotools' printing is silenced.

    Raises ValueError for an unknown IoU type, a prediction missing a field
    the IoU types need, or an ``image_id``/``category_id`` absent from the
    ground truth.
    """
    iou_types = tuple(iou_types)
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown or not iou_types:
        raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types}")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_json_path))
    _check_predictions(predictions, iou_types, set(coco_gt.getImgIds()), set(coco_gt.getCatIds()))
    results: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if not predictions:  # loadRes indexes the first result: it cannot take an empty list
            results[iou_type] = dict.fromkeys(COCO_STATS, 0.0)
            continue
        # Copies: loadRes writes id, area and iscrowd into the dicts it is given.
        if iou_type == "segm":
            dts = [{k: v for k, v in p.items() if k != "bbox"} for p in predictions]
        else:
            dts = [{k: v for k, v in p.items() if k != "segmentation"} for p in predictions]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(dts)
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        results[iou_type] = {name: float(v) for name, v in zip(COCO_STATS, evaluator.stats, strict=True)}
    return results


def to_coco_results(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int] | Sequence[int],
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """COCO result dicts from torchvision detector outputs (one dict per image, in ``image_ids`` order).

    Each output holds ``boxes`` (K, 4) x1, y1, x2, y2 in the original image's
    pixels, ``labels`` (K,) and ``scores`` (K,), and for Mask R-CNN
    ``masks`` (K, 1, H, W) probabilities, binarised at ``mask_threshold`` and
    RLE-encoded (``counts`` as str, so the results are JSON-serialisable).
    ``label_to_cat_id[label]`` maps the model's contiguous labels to COCO
    category ids (COCO's ids have gaps: 1..90 for 80 categories).
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs but {len(image_ids)} image ids")
    results: list[dict[str, Any]] = []
    for out, image_id in zip(outputs, image_ids, strict=True):
        boxes = out["boxes"].detach().cpu().to(torch.float64)
        labels = out["labels"].detach().cpu().tolist()
        scores = out["scores"].detach().cpu().tolist()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist() if len(boxes) else []
        rles: list[dict[str, Any]] | None = None
        masks = out.get("masks")
        if masks is not None:
            if masks.dim() != 4 or masks.shape[1] != 1 or masks.shape[0] != len(labels):
                raise ValueError(f"masks must be (K, 1, H, W) with K = {len(labels)}, got {tuple(masks.shape)}")
            binary = (masks[:, 0] > mask_threshold).detach().cpu().numpy().astype(np.uint8)  # (K, H, W)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
            for rle in rles:
                rle["counts"] = rle["counts"].decode("ascii")
        for k, (label, score, box) in enumerate(zip(labels, scores, xywh, strict=True)):
            try:
                cat_id = int(label_to_cat_id[label])
            except (KeyError, IndexError) as e:
                raise ValueError(f"label {label} of image {image_id} has no COCO category id in label_to_cat_id") from e
            result: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": cat_id,
                "bbox": [float(c) for c in box],
                "score": float(score),
            }
            if rles is not None:
                result["segmentation"] = {"size": [int(s) for s in rles[k]["size"]], "counts": rles[k]["counts"]}
            results.append(result)
    return results
