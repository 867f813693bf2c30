"""COCO detection data: the reader on tiny files in the release's format, the transforms, the shapes generator."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pycocotools")
# pycocotools' decode under numpy 2 warns on every call; nothing of ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
from pycocotools import mask as mask_api  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from polyattn.cli import main  # noqa: E402
from polyattn.data import DatasetFormatError, DatasetNotFoundError  # noqa: E402
from polyattn.data.coco import (  # noqa: E402
    CocoDetection,
    Compose,
    RandomHorizontalFlip,
    ResizeShorter,
    collate_detection,
    generate_coco_shapes,
)


# --- a hand-written COCO split ---------------------------------------------------------------------
def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"counts": [int(c) for c in counts], "size": list(mask.shape)}


def _box_of(mask: np.ndarray | torch.Tensor) -> list[float]:
    """xyxy pixel-edge box of a binary mask."""
    ys, xs = np.nonzero(np.asarray(mask))
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


H, W = 20, 30


def _masks() -> dict[str, np.ndarray]:
    poly = np.zeros((H, W), np.uint8)
    poly[3:9, 2:12] = 1  # what pycocotools rasterises the rectangle polygon (2, 3)-(12, 9) to
    unc = np.zeros((H, W), np.uint8)
    unc[12:17, 20:28] = 1
    unc[14, 20] = 0  # a hole, so the runs are not those of a plain rectangle
    comp = np.zeros((H, W), np.uint8)
    comp[10:19, 3:7] = 1
    comp[18, 3:5] = 0
    crowd = np.zeros((16, 16), np.uint8)
    crowd[1:6, 8:15] = 1
    return {"poly": poly, "unc": unc, "comp": comp, "crowd": crowd}


def _write_tiny_coco(root: Path, split: str = "val") -> dict:
    """Three images: 42 (RGB, five annotations, two of them skipped), 5 (greyscale, a crowd), 9 (none)."""
    m = _masks()
    (root / "annotations").mkdir(parents=True)
    (root / f"{split}2017").mkdir()
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 200, 255
    Image.fromarray(rgb).save(root / f"{split}2017" / "a.png")
    Image.fromarray(np.full((16, 16), 77, np.uint8), mode="L").save(root / f"{split}2017" / "grey.png")
    Image.new("RGB", (12, 10), (1, 2, 3)).save(root / f"{split}2017" / "empty.png")
    comp = mask_api.encode(np.asfortranarray(m["comp"]))
    comp["counts"] = comp["counts"].decode("ascii")  # as json holds it
    data = {
        "info": {},
        "images": [
            {"id": 42, "file_name": "a.png", "height": H, "width": W},
            {"id": 5, "file_name": "grey.png", "height": 16, "width": 16},
            {"id": 9, "file_name": "empty.png", "height": 10, "width": 12},
        ],
        # listed out of order and non-contiguous: labels must follow the sorted ids
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 42,
                "category_id": 7,
                "segmentation": [[2.0, 3.0, 12.0, 3.0, 12.0, 9.0, 2.0, 9.0]],
                "area": 60.0,
                "bbox": [2.0, 3.0, 10.0, 6.0],
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 42,
                "category_id": 3,
                "segmentation": _uncompressed_rle(m["unc"]),
                "area": float(m["unc"].sum()),
                "bbox": [20.0, 12.0, 8.0, 5.0],
                "iscrowd": 0,
            },
            {
                "id": 3,
                "image_id": 42,
                "category_id": 7,
                "segmentation": comp,
                "area": float(m["comp"].sum()),
                "bbox": [3.0, 10.0, 4.0, 9.0],
                "iscrowd": 0,
            },
            {  # under a pixel wide: skipped
                "id": 4,
                "image_id": 42,
                "category_id": 3,
                "segmentation": [[1.0, 1.0, 1.5, 1.0, 1.5, 5.0]],
                "area": 1.0,
                "bbox": [1.0, 1.0, 0.5, 4.0],
                "iscrowd": 0,
            },
            {  # no area: skipped
                "id": 5,
                "image_id": 42,
                "category_id": 3,
                "segmentation": [[5.0, 5.0, 9.0, 5.0, 9.0, 9.0]],
                "area": 0.0,
                "bbox": [5.0, 5.0, 4.0, 4.0],
                "iscrowd": 0,
            },
            {
                "id": 6,
                "image_id": 5,
                "category_id": 3,
                "segmentation": _uncompressed_rle(m["crowd"]),
                "area": float(m["crowd"].sum()),
                "bbox": [8.0, 1.0, 7.0, 5.0],
                "iscrowd": 1,
            },
        ],
    }
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return data


def test_reads_polygons_rles_crowd_and_empty_images(tmp_path):
    _write_tiny_coco(tmp_path)
    ds = CocoDetection(tmp_path, "val")
    m = _masks()
    assert len(ds) == 3 and ds.ids == [5, 9, 42]
    assert ds.cat_ids == [3, 7] and ds.label_to_cat_id == {1: 3, 2: 7} and ds.num_classes == 3
    assert ds.classes == ["__background__", "cat", "dog"]

    image, t = ds[ds.ids.index(42)]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert torch.allclose(image[:, 0, 0], torch.tensor([10, 200, 255]) / 255.0)
    assert t["image_id"] == 42
    assert t["boxes"].dtype == torch.float32
    assert t["boxes"].tolist() == [[2, 3, 12, 9], [20, 12, 28, 17], [3, 10, 7, 19]]
    assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [2, 1, 2]  # 7 -> 2, 3 -> 1
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (3, H, W)
    for got, name in zip(t["masks"], ("poly", "unc", "comp"), strict=True):
        assert np.array_equal(got.numpy(), m[name]), name
    assert t["iscrowd"].tolist() == [0, 0, 0]
    assert t["area"].tolist() == [60.0, float(m["unc"].sum()), float(m["comp"].sum())]

    image, t = ds[ds.ids.index(5)]
    assert image.shape == (3, 16, 16) and torch.allclose(image, torch.full_like(image, 77 / 255.0))  # grey -> RGB
    assert t["iscrowd"].tolist() == [1] and t["labels"].tolist() == [1]
    assert t["boxes"].tolist() == [[8, 1, 15, 6]]
    assert np.array_equal(t["masks"][0].numpy(), m["crowd"])

    image, t = ds[ds.ids.index(9)]
    assert image.shape == (3, 10, 12)
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    assert t["masks"].shape == (0, 10, 12) and t["masks"].dtype == torch.uint8
    assert t["iscrowd"].shape == (0,) and t["area"].shape == (0,)

    images, targets = collate_detection([ds[0], ds[1]])
    assert isinstance(images, list) and [i.shape[-1] for i in images] == [16, 12]
    assert [tt["image_id"] for tt in targets] == [5, 9]


def test_dataset_feeds_torchvision_maskrcnn_loss(tmp_path):
    tv = pytest.importorskip("torchvision")
    _write_tiny_coco(tmp_path)
    ds = CocoDetection(tmp_path, "val")
    torch.manual_seed(0)
    model = tv.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=ds.num_classes, min_size=32, max_size=64
    )
    model.train()
    images, targets = collate_detection([ds[i] for i in range(len(ds))])  # the empty image included
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


# --- errors ----------------------------------------------------------------------------------------
def test_missing_annotations_file_names_path_layout_and_generator(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        CocoDetection(tmp_path, "val")
    msg = str(e.value)
    assert str(tmp_path / "annotations" / "instances_val2017.json") in msg
    assert "annotations/instances_train2017.json" in msg and "val2017/<file_name>" in msg  # the layout
    assert "polyattn data coco-shapes --out DIR" in msg


def test_missing_image_folder(tmp_path):
    _write_tiny_coco(tmp_path)
    (tmp_path / "val2017").rename(tmp_path / "images")
    with pytest.raises(DatasetNotFoundError, match="image folder") as e:
        CocoDetection(tmp_path, "val")
    assert str(tmp_path / "val2017") in str(e.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"images": [', "not valid JSON"),
        ("[1, 2]", "JSON list, not an object"),
        ('{"images": [], "categories": []}', "lacks the list(s) 'annotations'"),
        ('{"images": {}, "annotations": []}', "'images', 'categories'"),
    ],
)
def test_malformed_json(tmp_path, text, expected):
    _write_tiny_coco(tmp_path)
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(text)
    with pytest.raises(DatasetFormatError) as e:
        CocoDetection(tmp_path, "val")
    assert expected in str(e.value) and str(path) in str(e.value)


def test_annotation_of_unknown_image_or_category(tmp_path):
    data = _write_tiny_coco(tmp_path)
    path = tmp_path / "annotations" / "instances_val2017.json"
    data["annotations"][2]["image_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError) as e:
        CocoDetection(tmp_path, "val")
    msg = str(e.value)
    assert "annotation 3" in msg and "image_id 99" in msg and str(path) in msg and "add that image" in msg

    data["annotations"][2]["image_id"] = 42
    data["annotations"][2]["category_id"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match="category_id 1"):
        CocoDetection(tmp_path, "val")


def test_missing_image_file_is_named(tmp_path):
    _write_tiny_coco(tmp_path)
    (tmp_path / "val2017" / "grey.png").unlink()
    ds = CocoDetection(tmp_path, "val")  # images are opened when read
    ds[ds.ids.index(42)]
    with pytest.raises(DatasetNotFoundError) as e:
        ds[ds.ids.index(5)]
    msg = str(e.value)
    assert str(tmp_path / "val2017" / "grey.png") in msg and "image 5" in msg and "instances_val2017.json" in msg


@pytest.mark.parametrize(
    "segmentation",
    [{"polygon": [1, 2, 3]}, "RLE", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], {"counts": 5, "size": [20, 30]}],
)
def test_unknown_segmentation_form(tmp_path, segmentation):
    data = _write_tiny_coco(tmp_path)
    data["annotations"][1]["segmentation"] = segmentation
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(data))
    ds = CocoDetection(tmp_path, "val")
    with pytest.raises(DatasetFormatError) as e:
        ds[ds.ids.index(42)]
    msg = str(e.value)
    assert "annotation 2" in msg and "unknown form" in msg and str(path) in msg
    assert "polygons [[x1, y1" in msg and "'size': [h, w]" in msg  # the accepted forms


def test_rle_of_the_wrong_size(tmp_path):
    data = _write_tiny_coco(tmp_path)
    data["annotations"][1]["segmentation"] = _uncompressed_rle(np.ones((4, 5), np.uint8))
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    ds = CocoDetection(tmp_path, "val")
    with pytest.raises(DatasetFormatError, match=r"RLE of size \[4, 5\], its image is 20x30"):
        ds[ds.ids.index(42)]


# --- the generator ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco_shapes")
    generate_coco_shapes(root, num_train=40, num_val=12, image_size=(48, 80), seed=3, max_shapes=4)
    return root


def test_generator_layout_and_coco_index(shapes_root):
    assert sorted(p.name for p in (shapes_root / "annotations").iterdir()) == [
        "instances_train2017.json",
        "instances_val2017.json",
    ]
    image_ids, ann_ids = set(), set()
    for split, n in (("train", 40), ("val", 12)):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(shapes_root / "annotations" / f"instances_{split}2017.json"))
        assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {
            1: "square",
            2: "circle",
            3: "triangle",
        }
        assert len(coco.imgs) == n
        assert sorted(p.name for p in (shapes_root / f"{split}2017").iterdir()) == sorted(
            im["file_name"] for im in coco.imgs.values()
        )
        per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.imgs]
        assert min(per_image) == 0 and max(per_image) <= 4  # empty images exist
        assert sum(c > 0 for c in per_image) >= n - max(1, n // 20)
        for im in coco.imgs.values():
            with Image.open(shapes_root / f"{split}2017" / im["file_name"]) as f:
                assert f.size == (im["width"], im["height"]) and f.mode == "RGB"
                assert 48 <= im["width"] <= 80 and 48 <= im["height"] <= 80
        assert not image_ids & set(coco.imgs) and not ann_ids & set(coco.anns)  # unique across the splits
        image_ids |= set(coco.imgs)
        ann_ids |= set(coco.anns)


def test_generated_polygons_match_boxes_areas_and_pixels(shapes_root):
    data = json.loads((shapes_root / "annotations" / "instances_train2017.json").read_text())
    images = {im["id"]: im for im in data["images"]}
    assert len(data["annotations"]) >= 40
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        h, w = im["height"], im["width"]
        (poly,) = ann["segmentation"]
        assert len(poly) in (2 * 4, 2 * 24, 2 * 3) and ann["iscrowd"] == 0
        assert {4: 1, 24: 2, 3: 3}[len(poly) // 2] == ann["category_id"]
        mask = mask_api.decode(mask_api.merge(mask_api.frPyObjects([poly], h, w)))
        assert ann["area"] == mask.sum() > 0
        x, y, bw, bh = ann["bbox"]
        # the mask lies in the polygon's box; a sharp vertex may poke up to ~2 px past the pixels it fills
        mx0, my0, mx1, my1 = _box_of(mask)
        assert x - 0.5 <= mx0 <= x + 2 and y - 0.5 <= my0 <= y + 2
        assert x + bw - 2 <= mx1 <= x + bw + 0.5 and y + bh - 2 <= my1 <= y + bh + 0.5
    # the pixels of each shape are exactly its mask, in one colour; nothing is drawn outside the masks
    for image_id, im in images.items():
        masks = [
            mask_api.decode(mask_api.merge(mask_api.frPyObjects(a["segmentation"], im["height"], im["width"])))
            for a in data["annotations"]
            if a["image_id"] == image_id
        ]
        with Image.open(shapes_root / "train2017" / im["file_name"]) as f:
            pixels = np.asarray(f)
        drawn = np.any(pixels != pixels[0, 0], axis=-1)  # the corner is kept clear of shapes
        covered = np.zeros_like(drawn)
        for mask in masks:
            inside = mask.astype(bool)
            assert not (covered & inside).any()  # shapes do not overlap
            covered |= inside
            assert len(np.unique(pixels[inside], axis=0)) == 1
        assert np.array_equal(drawn, covered)


def test_generator_is_deterministic(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        generate_coco_shapes(tmp_path / name, num_train=6, num_val=3, image_size=40, seed=seed)
    for rel in ("annotations/instances_train2017.json", "annotations/instances_val2017.json"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
        assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()
    files = sorted((tmp_path / "a" / "train2017").iterdir())
    assert [f.read_bytes() for f in files] == [(tmp_path / "b" / "train2017" / f.name).read_bytes() for f in files]


def test_generator_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate_coco_shapes(tmp_path, image_size=8)
    with pytest.raises(ValueError, match="max_shapes"):
        generate_coco_shapes(tmp_path, max_shapes=0)


def test_cli_coco_shapes(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "coco-shapes", "--out", str(out), "--train", "5", "--val", "3", "--size", "48"]) == 0
    assert "wrote" in capsys.readouterr().out
    ds = CocoDetection(out, "train")
    assert len(ds) == 5 and ds.num_classes == 4 and ds.cat_ids == [1, 2, 3]
    assert len(CocoDetection(out, "val")) == 3
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 48, 48) and t["masks"].shape[1:] == (48, 48)
        assert set(t["labels"].tolist()) <= {1, 2, 3}
    assert main(["data", "coco-shapes", "--out", str(out), "--size", "4"]) == 2
    assert "image_size" in capsys.readouterr().err


# --- transforms ------------------------------------------------------------------------------------
def _sample_with_mask_boxes(shapes_root: Path, index: int = 0) -> tuple[torch.Tensor, dict]:
    """A generated sample whose boxes are those of its masks, so transformed boxes can be checked exactly."""
    ds = CocoDetection(shapes_root, "train")
    for i in range(index, len(ds)):
        image, t = ds[i]
        if len(t["boxes"]) >= 2:
            t["boxes"] = torch.tensor([_box_of(m) for m in t["masks"]])
            return image, t
    raise AssertionError("no sample with two shapes")


def test_flip_twice_is_identity_and_boxes_follow_masks(shapes_root):
    image, t = _sample_with_mask_boxes(shapes_root)
    flip = RandomHorizontalFlip(p=1.0)
    fi, ft = flip(image, t)
    assert not torch.equal(fi, image)
    assert ft["boxes"].tolist() == [_box_of(m) for m in ft["masks"]]
    w = image.shape[-1]
    assert torch.equal(ft["boxes"][:, 0], w - t["boxes"][:, 2])
    assert torch.equal(fi[..., 0], image[..., -1]) and torch.equal(ft["masks"][..., 0], t["masks"][..., -1])
    gi, gt = flip(fi, ft)
    assert torch.equal(gi, image) and torch.equal(gt["masks"], t["masks"]) and torch.equal(gt["boxes"], t["boxes"])
    assert torch.equal(gt["labels"], t["labels"])
    same_i, same_t = RandomHorizontalFlip(p=0.0)(image, t)
    assert same_i is image and same_t is t


def test_resize_scales_boxes_with_masks(shapes_root):
    image, t = _sample_with_mask_boxes(shapes_root)
    h, w = image.shape[-2:]
    ri, rt = ResizeShorter(150, max_size=1000)(image, t)
    nh, nw = ri.shape[-2:]
    assert min(nh, nw) == 150 and abs(max(nh, nw) / 150 - max(h, w) / min(h, w)) < 0.02
    assert rt["masks"].shape == (len(t["masks"]), nh, nw) and rt["masks"].dtype == torch.uint8
    assert set(rt["masks"].unique().tolist()) <= {0, 1}
    sx, sy = nw / w, nh / h
    assert torch.allclose(rt["boxes"], t["boxes"] * torch.tensor([sx, sy, sx, sy]))
    scale = max(sx, sy)
    for box, mask in zip(rt["boxes"], rt["masks"], strict=True):
        # a pixel of the source mask spans `scale` pixels of the resized one: boxes agree to within that
        assert np.allclose(_box_of(mask), box.tolist(), atol=scale / 2 + 1e-6)
    assert torch.allclose(rt["area"], t["area"] * sx * sy)
    assert float(ri.min()) >= 0.0 and float(ri.max()) <= 1.0 + 1e-6


def test_resize_caps_the_long_side_and_handles_empty_targets():
    image = torch.rand(3, 40, 100)
    t = {
        "boxes": torch.zeros((0, 4)),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros((0, 40, 100), dtype=torch.uint8),
        "area": torch.zeros(0),
        "image_id": 1,
    }
    ri, rt = Compose([ResizeShorter(80, max_size=150), RandomHorizontalFlip(1.0)])(image, t)
    assert ri.shape == (3, 60, 150) and rt["masks"].shape == (0, 60, 150) and rt["boxes"].shape == (0, 4)
    assert ResizeShorter((32, 64)).size_for(40, 100, 64) == (64, 160)
    with pytest.raises(ValueError, match="max_size"):
        ResizeShorter(800, max_size=100)
