"""COCO detection experiment: pycocotools evaluation, the XCiT backbone, and a Mask R-CNN training step.

Everything runs on a tiny XCiT (embed_dim 48, 4 blocks, 4 heads) and images
of about 128 pixels, so the file stays fast on a CPU.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed")
pytest.importorskip("torchvision", reason="torchvision is not installed")
mask_utils = pytest.importorskip("pycocotools.mask", reason="pycocotools is not installed")

import polyattn  # noqa: E402
from polyattn.experiments.detection import (  # noqa: E402
    COCO_STATS,
    XCiTBackbone,
    build_mask_rcnn,
    evaluate_coco,
    to_coco_results,
)
from polyattn.integrations.timm import PolyXCA  # noqa: E402

TINY = {"embed_dim": 48, "depth": 4, "num_heads": 4}
TINY_NAME = "xcit_nano_12_p16_224"
OUT_INDICES = (0, 1, 2, 3)


# --------------------------------------------------------------------------- #
# a tiny COCO ground truth
# --------------------------------------------------------------------------- #
def _box_polygon(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _triangle(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y + h, x + w / 2, y, x + w, y + h]]


# image id -> (width, height, [(category id, polygon)])
GT_IMAGES = {
    1: (64, 48, [(1, _box_polygon(4, 4, 20, 16)), (2, _triangle(30, 10, 24, 30))]),
    2: (64, 64, [(2, _box_polygon(10, 20, 40, 30))]),
    7: (48, 64, [(1, _triangle(2, 2, 30, 40)), (1, _box_polygon(20, 44, 24, 16))]),
}


def _coco_dict(images: dict) -> dict:
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    for image_id, (w, h, anns) in images.items():
        data["images"].append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id}.png"})
        for cat, poly in anns:
            rle = mask_utils.merge(mask_utils.frPyObjects(poly, h, w))
            data["annotations"].append(
                {
                    "id": len(data["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": poly,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    return data


@pytest.fixture
def gt_json(tmp_path: Path) -> Path:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_coco_dict(GT_IMAGES)))
    return path


def _perfect_predictions(gt: dict) -> list[dict]:
    """The ground truth as results: its boxes, its masks as RLE (str counts), score 1."""
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    preds = []
    for ann in gt["annotations"]:
        h, w = sizes[ann["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))
        rle["counts"] = rle["counts"].decode("ascii")
        preds.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": ann["bbox"],
                "score": 1.0,
                "segmentation": rle,
            }
        )
    return preds


# --------------------------------------------------------------------------- #
# evaluate_coco / to_coco_results
# --------------------------------------------------------------------------- #
def test_ground_truth_as_predictions_scores_ap_1(gt_json: Path) -> None:
    preds = _perfect_predictions(json.loads(gt_json.read_text()))
    before = copy.deepcopy(preds)
    metrics = evaluate_coco(gt_json, preds)
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        stats = metrics[iou_type]
        assert list(stats) == list(COCO_STATS)
        assert all(isinstance(v, float) for v in stats.values())
        assert stats["AP"] == pytest.approx(1.0)
        assert stats["AP50"] == pytest.approx(1.0)
        assert stats["AP75"] == pytest.approx(1.0)
        assert stats["AR100"] == pytest.approx(1.0)
    assert preds == before  # pycocotools' loadRes got copies


def test_shifted_boxes_score_lower(gt_json: Path) -> None:
    preds = _perfect_predictions(json.loads(gt_json.read_text()))
    for p in preds:
        x, y, w, h = p["bbox"]
        p["bbox"] = [x + w / 3, y + h / 3, w, h]
    metrics = evaluate_coco(gt_json, preds, iou_types=("bbox",))
    assert set(metrics) == {"bbox"}
    assert 0.0 <= metrics["bbox"]["AP"] < 0.5
    assert metrics["bbox"]["AP75"] < 1.0


def test_empty_predictions_score_zero(gt_json: Path) -> None:
    metrics = evaluate_coco(gt_json, [])
    assert metrics == {t: dict.fromkeys(COCO_STATS, 0.0) for t in ("bbox", "segm")}


def test_bad_predictions_raise(gt_json: Path) -> None:
    preds = _perfect_predictions(json.loads(gt_json.read_text()))
    with pytest.raises(ValueError, match="image_id.*12345"):
        evaluate_coco(gt_json, [*preds, {**preds[0], "image_id": 12345}])
    with pytest.raises(ValueError, match="category_id.*99"):
        evaluate_coco(gt_json, [{**preds[0], "category_id": 99}])
    no_masks = [{k: v for k, v in p.items() if k != "segmentation"} for p in preds]
    with pytest.raises(ValueError, match="segmentation"):
        evaluate_coco(gt_json, no_masks, iou_types=("segm",))
    assert evaluate_coco(gt_json, no_masks, iou_types=("bbox",))["bbox"]["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="iou_types"):
        evaluate_coco(gt_json, preds, iou_types=("keypoints",))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools' decode, numpy 2
def test_to_coco_results_round_trips_the_ground_truth(gt_json: Path) -> None:
    """Ground-truth masks and boxes as torchvision outputs (xyxy, labels 0/1, (K,1,H,W) masks) score AP 1."""
    gt = json.loads(gt_json.read_text())
    outputs, image_ids = [], []
    for image_id, (w, h, anns) in GT_IMAGES.items():
        masks = []
        boxes = []
        for _, poly in anns:
            rle = mask_utils.merge(mask_utils.frPyObjects(poly, h, w))
            masks.append(torch.from_numpy(mask_utils.decode(rle)).float() * 0.9)
            x, y, bw, bh = mask_utils.toBbox(rle)
            boxes.append([x, y, x + bw, y + bh])
        outputs.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.tensor([cat - 1 for cat, _ in anns]),
                "scores": torch.linspace(0.9, 0.5, len(anns)),
                "masks": torch.stack(masks)[:, None],
            }
        )
        image_ids.append(image_id)
    outputs.append({k: v[:0] for k, v in outputs[0].items()})  # an image with no detections
    image_ids.append(2)
    results = to_coco_results(outputs, image_ids, {0: 1, 1: 2})
    assert len(results) == len(gt["annotations"])
    json.dumps(results)  # JSON-serialisable: RLE counts are str
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    metrics = evaluate_coco(gt_json, results)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="label 1"):
        to_coco_results(outputs[:1], [1], {0: 1})


# --------------------------------------------------------------------------- #
# the XCiT backbone
# --------------------------------------------------------------------------- #
def _tiny_timm_xcit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(TINY_NAME, pretrained=False, **TINY).eval()


@pytest.mark.parametrize("hw", [(128, 128), (96, 160)])
def test_backbone_scales(hw: tuple[int, int]) -> None:
    backbone = XCiTBackbone(TINY_NAME, OUT_INDICES, **TINY).eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, *hw))
    assert list(out) == ["0", "1", "2", "3"]
    for (name, feat), stride in zip(out.items(), (4, 8, 16, 32), strict=True):
        assert feat.shape == (2, 48, hw[0] // stride, hw[1] // stride), name
        assert torch.isfinite(feat).all()
    with pytest.raises(ValueError, match="multiples of the patch size"):
        backbone(torch.randn(1, 3, 100, 128))


def test_backbone_reproduces_timm_forward() -> None:
    """The backbone's block outputs are timm's own forward_intermediates (same modules, same order)."""
    model = _tiny_timm_xcit()
    ref = copy.deepcopy(model)
    backbone = XCiTBackbone(model=model, out_indices=OUT_INDICES).eval()
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        ours = backbone.forward_tokens(x)
        theirs = ref.forward_intermediates(x, indices=list(OUT_INDICES), intermediates_only=True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out_indices"):
        XCiTBackbone(model=_tiny_timm_xcit(), out_indices=(0, 1, 2, 4))


def test_softmax_patch_equals_timm_and_polynomial_differs() -> None:
    torch.manual_seed(0)
    reference = XCiTBackbone(TINY_NAME, OUT_INDICES, **TINY).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = reference(x)
    patched = copy.deepcopy(reference)
    # native_softmax=False: softmax computed by polyattn.attention, not timm's own forward.
    assert polyattn.patch(patched, "softmax", native_softmax=False) == len(OUT_INDICES)
    assert all(isinstance(blk.attn, PolyXCA) for blk in patched.blocks)
    with torch.no_grad():
        got = patched(x)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
    polyattn.patch(patched, "x^3/sqrt(N)")
    with torch.no_grad():
        poly = patched(x)
    assert max((poly[k] - expected[k]).abs().max().item() for k in expected) > 1e-3


# --------------------------------------------------------------------------- #
# Mask R-CNN
# --------------------------------------------------------------------------- #
def _synthetic_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for h, w, boxes, labels in [
        (128, 128, [[10, 12, 60, 70], [70, 30, 120, 110]], [1, 2]),
        (112, 144, [[20, 20, 100, 90]], [2]),
    ]:
        images.append(torch.rand(3, h, w, generator=g))
        masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            masks[i, y1:y2, x1:x2] = 1
        targets.append(
            {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels), "masks": masks}
        )
    return images, targets


def test_mask_rcnn_trains_and_evaluates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_mask_rcnn(
        "x^3/sqrt(N)",
        num_classes=3,
        backbone=TINY_NAME,
        out_indices=OUT_INDICES,
        fpn_channels=32,
        min_size=128,
        max_size=160,
        **TINY,
    )
    assert sum(isinstance(m, PolyXCA) for m in model.modules()) == len(OUT_INDICES)
    assert model.backbone.out_channels == 32
    images, targets = _synthetic_batch()

    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.backbone.body.blocks.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for out, img in zip(outputs, images, strict=True):
        assert out["masks"].shape[1:] == (1, *img.shape[1:])

    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    for image_id, (img, target) in enumerate(zip(images, targets, strict=True), start=1):
        gt["images"].append({"id": image_id, "height": img.shape[1], "width": img.shape[2]})
        for box, label, mask in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"], strict=True):
            rle = mask_utils.encode(mask.numpy()[:, :, None].copy(order="F"))[0]
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = box
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "segmentation": rle,
                    "iscrowd": 0,
                }
            )
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    results = to_coco_results(outputs, [1, 2], {1: 1, 2: 2})
    assert len(results) == sum(len(out["scores"]) for out in outputs) > 0
    metrics = evaluate_coco(gt_path, results)
    for iou_type in ("bbox", "segm"):
        assert 0.0 <= metrics[iou_type]["AP"] <= 1.0


def test_mask_rcnn_softmax_is_timm() -> None:
    """With softmax (the default) the backbone keeps timm's XCA: no polyattn class in the model."""
    model = build_mask_rcnn(
        num_classes=2, backbone=TINY_NAME, out_indices=OUT_INDICES, min_size=64, max_size=64, **TINY
    )
    assert not any(isinstance(m, PolyXCA) for m in model.modules())
    with pytest.raises(ValueError, match="pretrained"):
        build_mask_rcnn(backbone=TINY_NAME, pretrained=True)
