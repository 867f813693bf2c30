"""Datasets: digits, synthetic, and the on-disk loaders on files written in their real formats."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polyattn.data import (
    DataBundle,
    DatasetError,
    DatasetFormatError,
    DatasetNotFoundError,
    build_dataset,
    dataset_defaults,
    list_datasets,
    register_dataset,
)
from polyattn.data.cifar import CIFAR_MEAN, CIFAR_STD
from polyattn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, stratified_split


def write_image(path: Path, size=(64, 64), seed=0, fmt="JPEG") -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


# --- registry ---------------------------------------------------------------------
def test_registry_lists_builtin_datasets_and_rejects_unknown_keys():
    assert {"digits", "synthetic", "tiny_imagenet", "imagenet", "image_folder", "cifar10", "cifar100"} <= set(
        list_datasets()
    )
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits"):
        build_dataset({"name": "mnist"}, 0)
    with pytest.raises(ValueError, match="data.image_sz.*allowed"):
        build_dataset({"name": "synthetic", "image_sz": 8}, 0)
    with pytest.raises(ValueError, match="data.augment must be one of"):
        build_dataset({"name": "digits", "augment": "crop"}, 0)


def test_register_dataset_declares_its_keys():
    @register_dataset("_test_tiny", defaults={"length": 3})
    def build(cfg, seed):
        x = torch.zeros(cfg["length"], 1, 2, 2)
        ds = torch.utils.data.TensorDataset(x, torch.zeros(cfg["length"], dtype=torch.long))
        return DataBundle(ds, ds, None, 1, {"num_classes": 1})

    assert dataset_defaults("_test_tiny")["length"] == 3
    assert len(build_dataset({"name": "_test_tiny", "length": 5}, 0).train) == 5
    with pytest.raises(ValueError, match="common data keys"):
        register_dataset("_test_bad", defaults={"root": "x"})


def test_errors_are_value_errors_with_path_and_layout():
    err = DatasetNotFoundError.for_path("/x/y", "ROOT/\n  a.txt", hint="run polyattn make-data")
    assert isinstance(err, ValueError) and isinstance(err, DatasetError)
    text = str(err)
    assert "/x/y" in text and "expected layout:" in text and "a.txt" in text and "make-data" in text
    assert str(DatasetNotFoundError("plain")) == "plain"


# --- digits -------------------------------------------------------------------------
def test_digits_split_is_fixed_stratified_and_normalised():
    a = build_dataset({"name": "digits"}, seed=0)
    b = build_dataset({"name": "digits"}, seed=123)  # the training seed does not move the split
    assert len(a.train) + len(a.val) == 1797 and len(a.val) == 359
    assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.val.images, b.val.images)
    assert torch.bincount(a.val.labels).min() >= 30  # every class is in the validation set
    c = build_dataset({"name": "digits", "seed": 1}, seed=0)
    assert not torch.equal(a.val.images, c.val.images)
    x = torch.stack([a.train[i][0] for i in range(len(a.train))])
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    assert a.model_overrides == {"img_size": 8, "in_chans": 1, "num_classes": 10}
    assert x.shape[1:] == (1, 8, 8)


def test_stratified_split_is_disjoint_and_complete():
    labels = torch.arange(100) % 4
    tr, va = stratified_split(labels, 0.25, seed=3)
    assert sorted(tr + va) == list(range(100)) and not set(tr) & set(va)
    assert torch.bincount(labels[va]).tolist() == [6, 6, 6, 6] or torch.bincount(labels[va]).tolist() == [7] * 4
    with pytest.raises(ValueError):
        stratified_split(labels, 1.0, 0)


def test_digits_light_augmentation_shifts_images():
    plain = build_dataset({"name": "digits"}, 0).train
    aug = build_dataset({"name": "digits", "augment": "light"}, 0).train
    torch.manual_seed(0)
    shifted = [aug[i][0] for i in range(50)]
    same = sum(torch.equal(s, plain[i][0]) for i, s in enumerate(shifted))
    assert same < 25 and all(s.shape == (1, 8, 8) for s in shifted)


# --- synthetic ----------------------------------------------------------------------
def test_synthetic_is_deterministic_sized_and_learnable():
    cfg = {
        "name": "synthetic",
        "num_train": 200,
        "num_val": 100,
        "num_test": 20,
        "num_classes": 5,
        "image_size": [12, 8],
        "channels": 2,
    }
    a, b = build_dataset(cfg, 0), build_dataset(cfg, 9)
    assert torch.equal(a.train.images, b.train.images)
    assert a.train.images.shape == (200, 2, 12, 8) and len(a.test) == 20
    assert a.model_overrides == {"img_size": [12, 8], "in_chans": 2, "num_classes": 5}
    assert torch.bincount(a.train.labels).tolist() == [40] * 5
    # Learnable: nearest class mean from the training split classifies validation well.
    means = torch.stack([a.train.images[a.train.labels == c].mean(0) for c in range(5)])
    d = ((a.val.images[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (d.argmin(1) == a.val.labels).float().mean() > 0.9
    other = build_dataset({**cfg, "seed": 1}, 0)
    assert not torch.equal(a.train.images, other.train.images)


# --- Tiny-ImageNet --------------------------------------------------------------------
def make_tiny_imagenet(
    root: Path, wnids=("n01", "n02", "n03"), per_class=2, val=(("v0.JPEG", "n02"), ("v1.JPEG", "n01"))
):
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for i, w in enumerate(wnids):
        for j in range(per_class):
            write_image(root / "train" / w / "images" / f"{w}_{j}.JPEG", seed=10 * i + j)
    lines = []
    for i, (name, w) in enumerate(val):
        write_image(root / "val" / "images" / name, seed=100 + i)
        lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet_layout_is_read(tmp_path):
    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    for given in (root, tmp_path):  # the folder itself or its parent
        b = build_dataset({"name": "tiny_imagenet", "root": str(given)}, 0)
        assert len(b.train) == 6 and len(b.val) == 2 and b.num_classes == 3
    assert [label for _, label in b.val.samples] == [1, 0]
    x, y = b.val[0]
    assert x.shape == (3, 64, 64) and y.item() == 1
    # The tensor is the JPEG's pixels, normalised with ImageNet statistics.
    pixels = np.asarray(Image.open(root / "val" / "images" / "v0.JPEG").convert("RGB"), dtype=np.float32) / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x * std + mean, torch.from_numpy(pixels).permute(2, 0, 1), atol=1e-5, rtol=0)
    small = build_dataset({"name": "tiny_imagenet", "root": str(root), "image_size": 32, "augment": "crop"}, 0)
    assert small.train[0][0].shape == (3, 32, 32) and small.val[1][0].shape == (3, 32, 32)
    assert small.model_overrides == {"img_size": 32, "in_chans": 3, "num_classes": 3}


def test_tiny_imagenet_missing_or_malformed(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data.root is not set") as e:
        build_dataset({"name": "tiny_imagenet"}, 0)
    assert "wnids.txt" in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="expected layout") as e:
        build_dataset({"name": "tiny_imagenet", "root": str(tmp_path / "nowhere")}, 0)
    assert str(tmp_path / "nowhere") in str(e.value)

    root = make_tiny_imagenet(tmp_path / "a")
    (root / "wnids.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="class list not found.*wnids.txt"):
        build_dataset({"name": "tiny_imagenet", "root": str(root)}, 0)

    root = make_tiny_imagenet(tmp_path / "b", wnids=("n01", "n02"))
    (root / "wnids.txt").write_text("n01\nn02\nn09\n")
    with pytest.raises(DatasetNotFoundError, match=r"class n09.*train/n09/images"):
        build_dataset({"name": "tiny_imagenet", "root": str(root)}, 0)

    root = make_tiny_imagenet(tmp_path / "c")
    (root / "val" / "val_annotations.txt").write_text("v0.JPEG n02 0 0 63 63\n")  # spaces, not tabs
    with pytest.raises(DatasetFormatError, match="line 1: expected tab-separated"):
        build_dataset({"name": "tiny_imagenet", "root": str(root)}, 0)

    root = make_tiny_imagenet(tmp_path / "d", val=(("v0.JPEG", "n07"),))
    with pytest.raises(DatasetFormatError, match="class 'n07' is not in wnids.txt"):
        build_dataset({"name": "tiny_imagenet", "root": str(root)}, 0)

    root = make_tiny_imagenet(tmp_path / "e")
    (root / "val" / "images" / "v1.JPEG").unlink()
    with pytest.raises(DatasetNotFoundError, match="line 2 of val_annotations.txt"):
        build_dataset({"name": "tiny_imagenet", "root": str(root)}, 0)

    root = make_tiny_imagenet(tmp_path / "f")
    (root / "val" / "images" / "v0.JPEG").write_bytes(b"not a jpeg")
    ds = build_dataset({"name": "tiny_imagenet", "root": str(root)}, 0).val
    with pytest.raises(DatasetFormatError, match="cannot read image.*v0.JPEG"):
        ds[0]


# --- ImageNet class folders ----------------------------------------------------------
def test_imagenet_class_folders(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for c in ("n015", "n014"):
            for j in range(n):
                write_image(tmp_path / split / c / f"{c}_{j}.JPEG", size=(80, 60), seed=j)
    write_image(tmp_path / "train" / "n014" / "extra.png", size=(50, 70), fmt="PNG")
    (tmp_path / "train" / "n014" / "notes.txt").write_text("not an image")
    b = build_dataset({"name": "imagenet", "root": str(tmp_path), "image_size": 48}, 0)
    assert b.num_classes == 2 and len(b.train) == 7 and len(b.val) == 2
    assert sorted({label for _, label in b.train.samples}) == [0, 1]
    assert all(Path(p).parent.name == ("n014", "n015")[label] for p, label in b.train.samples)
    assert b.train[0][0].shape == (3, 48, 48) and b.val[0][0].shape == (3, 48, 48)
    assert b.model_overrides["num_classes"] == 2


def test_imagenet_errors(tmp_path):
    write_image(tmp_path / "train" / "a" / "0.JPEG")
    with pytest.raises(DatasetNotFoundError, match="val/ folder not found") as e:
        build_dataset({"name": "imagenet", "root": str(tmp_path)}, 0)
    assert "train/<class>/*.JPEG" in str(e.value)
    write_image(tmp_path / "val" / "b" / "0.JPEG")
    with pytest.raises(DatasetFormatError, match="missing from train/: b"):
        build_dataset({"name": "image_folder", "root": str(tmp_path)}, 0)


# --- CIFAR -----------------------------------------------------------------------------
def _pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(root: Path, per_batch=4) -> Path:
    folder = root / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        _pickle(
            folder / name,
            {
                b"batch_label": name.encode(),
                b"labels": [(i + j) % 10 for j in range(per_batch)],
                b"data": data,
                b"filenames": [b"x.png"] * per_batch,
            },
        )
    _pickle(
        folder / "batches.meta",
        {
            b"label_names": [f"c{i}".encode() for i in range(10)],
            b"num_cases_per_batch": per_batch,
            b"num_vis": 3072,
        },
    )
    return folder


def make_cifar100(root: Path, n=6) -> Path:
    folder = root / "cifar-100-python"
    rng = np.random.default_rng(1)
    for name in ("train", "test"):
        _pickle(
            folder / name,
            {
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"fine_labels": [(7 * j) % 100 for j in range(n)],
                b"coarse_labels": [j % 20 for j in range(n)],
            },
        )
    _pickle(
        folder / "meta",
        {
            b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
        },
    )
    return folder


def test_cifar10_pickles_are_read_pixel_exact(tmp_path):
    folder = make_cifar10(tmp_path)
    b = build_dataset({"name": "cifar10", "root": str(tmp_path)}, 0)
    assert len(b.train) == 20 and len(b.val) == 4 and b.test is None and b.num_classes == 10
    with open(folder / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    x, y = b.train[5]  # second image of data_batch_2
    assert y.item() == raw[b"labels"][1]
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    pixels = torch.from_numpy(raw[b"data"][1].reshape(3, 32, 32).astype(np.float32))
    torch.testing.assert_close((x * std + mean) * 255, pixels, atol=1e-3, rtol=0)
    assert b.info["classes"][3] == "c3"
    # The folder itself also works; a validation fraction keeps the test set as test.
    c = build_dataset({"name": "cifar10", "root": str(folder), "val_fraction": 0.25, "image_size": 16}, 0)
    assert len(c.train) + len(c.val) == 20 and len(c.test) == 4
    assert c.train[0][0].shape == (3, 16, 16) and c.model_overrides["img_size"] == 16


def test_cifar100_fine_labels(tmp_path):
    make_cifar100(tmp_path)
    b = build_dataset({"name": "cifar100", "root": str(tmp_path), "augment": "light"}, 0)
    assert b.num_classes == 100 and len(b.train) == 6
    assert [b.val[j][1].item() for j in range(6)] == [(7 * j) % 100 for j in range(6)]
    assert b.train[0][0].shape == (3, 32, 32)


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar10 folder not found") as e:
        build_dataset({"name": "cifar10", "root": str(tmp_path / "none")}, 0)
    assert "data_batch_1" in str(e.value)
    folder = make_cifar10(tmp_path / "a")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        build_dataset({"name": "cifar10", "root": str(folder)}, 0)
    folder = make_cifar10(tmp_path / "b")
    (folder / "test_batch").write_bytes(b"\x00garbage")
    with pytest.raises(DatasetFormatError, match="not a readable pickle.*test_batch|test_batch.*"):
        build_dataset({"name": "cifar10", "root": str(folder)}, 0)
    folder = make_cifar10(tmp_path / "c")
    _pickle(folder / "data_batch_1", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DatasetFormatError, match=r"shape \(N, 3072\)"):
        build_dataset({"name": "cifar10", "root": str(folder)}, 0)
    folder = make_cifar100(tmp_path / "d")
    _pickle(folder / "train", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DatasetFormatError, match="b'fine_labels'"):
        build_dataset({"name": "cifar100", "root": str(tmp_path / "d")}, 0)


def test_digits_test_split_and_image_size():
    from polyattn.data.registry import build_dataset

    base = {"name": "digits", "seed": 0, "augment": "none", "val_fraction": 0.2}
    plain = build_dataset({**base, "test_fraction": 0.0, "image_size": 8}, 0)
    assert (len(plain.train), len(plain.val), plain.test) == (1438, 359, None)
    three = build_dataset({**base, "test_fraction": 0.2, "image_size": 8}, 0)
    sizes = (len(three.train), len(three.val), len(three.test))
    assert sum(sizes) == 1797 and abs(sizes[1] - 359) <= 10 and abs(sizes[2] - 359) <= 10
    # The test split does not move when the validation fraction changes, and the splits are disjoint.
    other = build_dataset({**base, "val_fraction": 0.1, "test_fraction": 0.2, "image_size": 8}, 0)
    assert torch.equal(other.test.images, three.test.images)
    # The 1,797 digits are pairwise distinct images, so distinct images across splits = disjoint splits.
    seen = {tuple(x.flatten().tolist()) for ds in (three.train, three.val, three.test) for x in ds.images}
    assert len(seen) == 1797
    big = build_dataset({**base, "test_fraction": 0.0, "image_size": 16}, 0)
    x, _ = big.train[0]
    assert x.shape == (1, 16, 16) and big.model_overrides["img_size"] == 16
    with pytest.raises(DatasetError, match="must be below 1"):
        build_dataset({**base, "val_fraction": 0.5, "test_fraction": 0.5, "image_size": 8}, 0)


def test_digits_read_from_the_bundled_file_equal_load_digits():
    from sklearn.datasets import load_digits

    from polyattn.data.digits import _bundled_csv, load_digits_tensors

    assert _bundled_csv() is not None  # else the fallback below is all that runs
    images, labels = load_digits_tensors()
    d = load_digits()
    assert torch.equal(images, torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0)
    assert torch.equal(labels, torch.as_tensor(d.target, dtype=torch.long))
