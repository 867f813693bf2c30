"""timm's data pipeline pieces: augment=timm (RandAugment, random erasing), timm's Mixup, weight EMA."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_setting import comparable, small_cfg, small_vit

pytest.importorskip("timm")

from polyattn.cli import main  # noqa: E402
from polyattn.data.errors import DatasetError  # noqa: E402
from polyattn.data.registry import build_dataset  # noqa: E402
from polyattn.training import load_config, train  # noqa: E402
from polyattn.training.trainer import apply_mixup, build_model, model_kwargs, timm_mixup  # noqa: E402
from polyattn.utils import read_jsonl, seed_everything  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_image_folder(root: Path, classes=("a", "b"), per_class=2) -> Path:
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for j in range(per_class):
                rng = np.random.default_rng(j + 10 * classes.index(c))
                arr = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{j}.JPEG")
    return root


TIMM_DATA = {"augment": "timm", "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}


@pytest.mark.parametrize("name", ["imagenet", "image_folder"])
def test_augment_timm_builds_timms_training_transform(tmp_path, name):
    root = make_image_folder(tmp_path)
    b = build_dataset({"name": name, "root": str(root), "image_size": 32, **TIMM_DATA}, 0)
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert b.val[0][0].shape == (3, 32, 32)
    chain = [type(t).__name__ for t in b.train.transform.timm.transforms]
    assert "RandAugment" in chain and "RandomErasing" in chain and "RandomResizedCropAndInterpolation" in chain
    erasing = b.train.transform.timm.transforms[chain.index("RandomErasing")]
    assert erasing.probability == 0.25 and erasing.mode == "pixel"
    assert b.val.transform.timm is None  # evaluation: resize by crop_pct, central crop


def test_timm_augment_keys_are_checked_and_timm_is_optional(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path)
    with pytest.raises(ValueError, match="augment=timm only"):
        build_dataset({"name": "imagenet", "root": str(root), "re_prob": 0.25}, 0)
    with pytest.raises(ValueError, match="re_prob"):
        build_dataset({"name": "imagenet", "root": str(root), "augment": "timm", "re_prob": 1.5}, 0)
    monkeypatch.setitem(sys.modules, "timm.data", None)  # import timm.data now raises ImportError
    with pytest.raises(DatasetError, match=r"pip install polyattn\[timm\]"):
        build_dataset({"name": "imagenet", "root": str(root), **TIMM_DATA}, 0)


def test_training_on_timm_augmented_images(tmp_path):
    root = make_image_folder(tmp_path / "data")
    data = {"name": "image_folder", "root": str(root), "image_size": 32, "num_workers": 0, **TIMM_DATA}
    cfg = load_config(None, [f"data={data}", *small_vit(1, 16), "train.batch_size=2", "train.epochs=1"])
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 2 and not summary["diverged"]


def test_timm_mixup_targets_carry_the_smoothing_once_and_odd_batches_work():
    torch.manual_seed(0)
    mixer = timm_mixup(0.8, 1.0, 0.1, 5)
    for n in (4, 5):
        x, y = torch.randn(n, 3, 8, 8), torch.randint(0, 5, (n,))
        xm, t = apply_mixup(mixer, x.clone(), y)
        assert xm.shape == x.shape and t.shape == (n, 5)
        assert torch.allclose(t.sum(-1), torch.ones(n))
        assert t.min() >= 0.1 / 5 - 1e-6  # smoothed once: every class keeps at least ls / C


def test_ema_weights_follow_timms_formula(tmp_path):
    cfg = small_cfg("train.ema_decay=0.5", "train.max_steps=1")
    train(cfg, tmp_path / "run", progress=False)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    # The initial weights, built as the trainer's setup builds them.
    seed_everything(cfg["train"]["seed"])
    bundle = build_dataset(cfg["data"], cfg["train"]["seed"])
    init = build_model(cfg["model"]["name"], cfg["model"]["activation"], model_kwargs(cfg, bundle)).state_dict()
    differs = False
    for k, raw in ckpt["model"].items():
        ema = ckpt["ema"][k]
        if not raw.is_floating_point():
            assert torch.equal(ema, raw), k
            continue
        assert torch.allclose(ema, init[k].lerp(raw, 0.5), atol=1e-7, rtol=0), k
        differs = differs or not torch.equal(ema, raw)
    assert differs


def test_ema_is_evaluated_and_reported(tmp_path):
    summary = train(small_cfg("train.ema_decay=0.5", "data.num_test=20"), tmp_path / "run", progress=False)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert all(r["val_acc_ema"] is not None and r["val_loss_ema"] is not None for r in rows)
    assert summary["final_val_acc_ema"] == rows[-1]["val_acc_ema"]
    assert summary["test_acc"] is not None and summary["test_acc_raw"] == summary["test_acc_last"]


class _Kill(Exception):
    pass


def test_resume_with_ema_and_timm_mixup_is_bitwise_identical(tmp_path):
    extra = [
        "model.overrides.drop_path_rate=0.2",
        "data.augment=light",
        "train.mixup=0.4",
        "train.cutmix=1.0",
        "train.mixup_impl=timm",
        "train.ema_decay=0.5",
    ]
    full = train(small_cfg(*extra), tmp_path / "full", progress=False)

    def kill(row):
        if row["kind"] == "step" and row["step"] == 10:
            raise _Kill

    with pytest.raises(_Kill):
        train(small_cfg(*extra), tmp_path / "cut", progress=False, callbacks=[kill])
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert comparable(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == comparable(
        read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    )
    resumed = read_jsonl(tmp_path / "cut" / "metrics.jsonl")[-1]
    assert resumed["final_val_acc_ema"] == full["final_val_acc_ema"] and resumed["steps"] == 12


def test_timm_mixup_differs_from_polyattns_and_ema_with_best_val_is_refused(tmp_path):
    a = train(small_cfg("train.mixup=0.4", "train.epochs=1"), tmp_path / "a", progress=False)
    b = train(small_cfg("train.mixup=0.4", "train.epochs=1", "train.mixup_impl=timm"), tmp_path / "b", progress=False)
    assert a["final_val_loss"] != b["final_val_loss"]
    with pytest.raises(ValueError, match="select=best_val"):
        train(small_cfg("train.ema_decay=0.5", "train.select=best_val"), tmp_path / "c", progress=False)


@pytest.mark.parametrize(
    "path, ema",
    [
        ("configs/base/imagenet_deit.yaml", 0.99996),
        ("configs/timm/base/imagenet_swin.yaml", 0.0),
        ("configs/timm/base/imagenet_xcit.yaml", 0.0),
    ],
)
def test_imagenet_recipes_use_timms_pipeline(path, ema):
    cfg = load_config(REPO / path, ["data.root=/data/imagenet"])
    d, t = cfg["data"], cfg["train"]
    assert (d["augment"], d["auto_augment"], d["re_prob"]) == ("timm", "rand-m9-mstd0.5-inc1", 0.25)
    assert (t["mixup"], t["cutmix"], t["mixup_impl"], t["ema_decay"]) == (0.8, 1.0, "timm", ema)


def test_without_timm_the_trainer_falls_back_to_mix_batch_and_plain_ema(tmp_path, monkeypatch):
    extra = ("train.mixup=0.4", "train.ema_decay=0.5", "train.epochs=1")

    def run(name: str, *more: str) -> dict:
        train(small_cfg(*extra, *more), tmp_path / name, progress=False)
        return torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=False)

    with_timm = run("a", "train.mixup_impl=timm")
    polyattn_mix = run("c")  # mix_batch and ModelEmaV3
    for mod in ("timm", "timm.data", "timm.utils"):
        monkeypatch.setitem(sys.modules, mod, None)
    plain = run("b", "train.mixup_impl=timm")  # mix_batch and PlainEma
    for k in plain["model"]:
        assert torch.equal(plain["model"][k], polyattn_mix["model"][k]), k
        assert torch.equal(plain["ema"][k], polyattn_mix["ema"][k]), k
    assert any(not torch.equal(plain["model"][k], with_timm["model"][k]) for k in plain["model"])
