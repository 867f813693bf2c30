"""Config loading and the trainer: run directory, exact resume, divergence, diagnostics, DDP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from synthetic_setting import SMALL, comparable, small_cfg

from polyattn.cli import main
from polyattn.models import register_model
from polyattn.training import (
    ConfigError,
    RunExistsError,
    dump_config,
    load_config,
    load_run,
    register_config_section,
    resolve_config,
    train,
)
from polyattn.training.precision import resolve_run_precision
from polyattn.training.trainer import lr_at, mix_batch
from polyattn.utils import read_jsonl

REPO = Path(__file__).resolve().parents[1]


# A small, fast setting: 64 synthetic 8x8 images, 4 steps per epoch, a 2-block model.


# --- config ---------------------------------------------------------------------------------
def test_defaults_and_typed_overrides():
    cfg = load_config(
        None,
        [
            "train.lr=1e-3",
            "train.epochs=5",
            "model.activation=X^3 / sqrt(N)",
            "model.overrides.patch_size=[2, 4]",
            "train.amp=off",
        ],
    )
    assert cfg["train"]["lr"] == 1e-3 and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["epochs"] == 5
    assert cfg["model"]["activation"] == "x^3/sqrt(N)"  # canonical spec
    assert cfg["model"]["overrides"] == {"patch_size": [2, 4]}
    assert cfg["train"]["amp"] == "off"
    assert cfg["data"]["name"] == "digits" and cfg["model"]["name"] == "vit_micro"
    assert set(cfg) == {"model", "data", "train", "diagnostics"}


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.epoch=3",
            r"unknown config key train.epoch \(did you mean train.epochs\?\).*train.batch_size",
        ),
        ("trian.lr=1", "unknown config key trian.*allowed keys: model, data, train, diagnostics"),
        ("model.activation=x^^3", "(?s)model.activation: bad activation spec.*accepted forms"),
        ("model.activation=softmax/2", "model.activation"),
        ("model.name=vit_huge", "model.name: unknown model 'vit_huge'.*vit_micro"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("train.lr=fast", "train.lr must be a number"),
        ("train.epochs=2.5", "train.epochs must be an integer"),
        ("train.amp=fp8", r"train.amp must be one of \['auto', 'off', 'bf16', 'fp16'\]"),
        ("data.augment=crop", "data.augment must be one of"),
        ("data.num_train=5", "unknown config key data.num_train"),
        ("data.name=mnist", "data.name: unknown dataset 'mnist'"),
        ("diagnostics.every=-1", "diagnostics.every must be >= 0"),
        ("train.label_smoothing=1", r"train.label_smoothing must be in \[0, 1\)"),
        ("train.epochs", "must look like key=value"),
    ],
)
def test_bad_keys_and_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_inherit_chain_merges_and_paths_are_relative(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "root.yaml").write_text(
        yaml.safe_dump(
            {
                "description": "root",
                "model": {"activation": "x/16", "overrides": {"patch_size": 2, "depth": 2}},
                "train": {"epochs": 7, "lr": "1e-3"},
            }
        )
    )
    (tmp_path / "child.yaml").write_text(
        "inherit: base/root.yaml\nmodel:\n  overrides:\n    depth: 3\ntrain:\n  epochs: 9\n"
    )
    cfg = load_config(tmp_path / "child.yaml", ["train.batch_size=8"])
    assert cfg["model"]["overrides"] == {"patch_size": 2, "depth": 3}
    assert (cfg["train"]["epochs"], cfg["train"]["lr"], cfg["train"]["batch_size"]) == (9, 1e-3, 8)
    assert cfg["model"]["activation"] == "x/16" and "description" not in cfg
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="inherit cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("inherit: missing.yaml\n")
    with pytest.raises(ConfigError, match="inherited config file not found.*missing.yaml"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_switching_dataset_drops_keys_the_new_one_lacks(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  name: tiny_imagenet\n  root: /data/tiny\n  crop_pct: 0.9\n  image_size: 64\n")
    cfg = load_config(f, ["data.name=synthetic", "data.num_train=10"])
    assert cfg["data"]["name"] == "synthetic" and "crop_pct" not in cfg["data"]
    assert cfg["data"]["image_size"] == 64 and cfg["data"]["num_train"] == 10 and cfg["data"]["root"] == "/data/tiny"
    whole = load_config(f, ["data={name: synthetic, num_val: 3}"])  # a mapping replaces the section
    assert whole["data"]["root"] is None and whole["data"]["num_val"] == 3


def test_registered_sections_and_roundtrip(tmp_path, monkeypatch):
    # The registration stays inside this test: every later config (and the fresh worker processes of a
    # parallel grid, which never see it) would otherwise carry a _test_extra section.
    import polyattn.training.config as config_module

    monkeypatch.setattr(config_module, "_EXTRA", {})
    register_config_section("_test_extra", {"alpha": 0.5, "mode": "a", "path": None})
    cfg = load_config(None, ["_test_extra.alpha=2", "_test_extra.path=/x"])
    assert cfg["_test_extra"] == {"alpha": 2.0, "mode": "a", "path": "/x"}
    with pytest.raises(ConfigError, match="_test_extra.mode must be a string"):
        load_config(None, ["_test_extra.mode=[1]"])
    with pytest.raises(ValueError, match="already registered"):
        register_config_section("_test_extra", {"alpha": 0.7})
    register_config_section("_test_extra", {"alpha": 0.5})  # same default: fine
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 0.1, 4, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 15 / 16)).item()))
    assert lr_at(20, 1.0, 0.1, 4, 20) == pytest.approx(0.1)


def test_mixup_and_cutmix_targets():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 6, 6), torch.arange(8) % 3
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        xm, t = mix_batch(x, y, 3, mixup, cutmix)
        assert xm.shape == x.shape and t.shape == (8, 3)
        torch.testing.assert_close(t.sum(1), torch.ones(8))


# --- a run ----------------------------------------------------------------------------------
def test_run_directory_contents_and_learning(tmp_path):
    out = tmp_path / "run"
    summary = train(small_cfg("train.epochs=4"), out, progress=False)
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    # config.yaml records what ran: train.amp=auto as resolved on this machine
    assert load_config(out / "config.yaml") == resolve_run_precision(small_cfg("train.epochs=4"))
    rows = read_jsonl(out / "metrics.jsonl")
    kinds = [r["kind"] for r in rows]
    assert kinds.count("step") == 16 and kinds.count("epoch") == 4 and kinds[-1] == "summary"
    epoch_rows = [r for r in rows if r["kind"] == "epoch"]
    assert {"epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "time_s"} <= set(epoch_rows[0])
    assert [r["step"] for r in epoch_rows] == [4, 8, 12, 16]
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "epoch", "step", "rng", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 4 and ckpt["step"] == 16
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"][0])
    assert summary["epochs"] == 4 and summary["steps"] == 16 and not summary["diverged"]
    assert summary["diverged_step"] is None and summary["test_acc"] is None
    assert summary["final_val_acc"] > 0.6  # 4 classes: chance is 0.25
    assert summary["best_val_acc"] == max(r["val_acc"] for r in epoch_rows)
    model, cfg = load_run(out)
    assert not model.training and cfg["model"]["name"] == "vit_micro"
    assert model.attention_maps(torch.randn(2, 1, 8, 8))[0].shape == (2, 2, 5, 5)
    with pytest.raises(RunExistsError, match="--resume"):
        train(small_cfg(), out, progress=False)


def test_max_steps_warmup_steps_and_test_split(tmp_path):
    cfg = small_cfg("train.max_steps=6", "train.warmup_steps=3", "train.min_lr=0", "data.num_test=12")
    s = train(cfg, tmp_path / "r", progress=False)
    assert s["steps"] == 6 and s["epochs"] == 2 and s["test_acc"] is not None
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "step"]
    assert lrs == pytest.approx([lr_at(i, 3e-3, 0.0, 3, 6) for i in range(6)])
    assert lrs[:3] == pytest.approx([1e-3, 2e-3, 3e-3])


def test_init_from_another_image_size_and_class_count(tmp_path, capsys):
    train(small_cfg("train.epochs=1"), tmp_path / "src", progress=False)
    src = torch.load(tmp_path / "src" / "checkpoints" / "last.pt", weights_only=False)["model"]
    cfg = small_cfg(
        f"model.init_from={tmp_path / 'src'}",
        "data.image_size=16",
        "data.num_classes=5",
        "train.max_steps=1",
        "train.lr=1e-12",
        "train.weight_decay=0",
    )
    train(cfg, tmp_path / "dst", progress=False)
    assert "skipped (shape differs) ['head.weight', 'head.bias']" in capsys.readouterr().err
    dst = torch.load(tmp_path / "dst" / "checkpoints" / "last.pt", weights_only=False)["model"]
    torch.testing.assert_close(dst["blocks.1.mlp.fc1.weight"], src["blocks.1.mlp.fc1.weight"], atol=1e-9, rtol=0)
    assert dst["pos_embed"].shape == (1, 1 + 16, 32) and dst["head.weight"].shape == (5, 32)
    with pytest.raises(ConfigError, match="model.init_from: no checkpoint"):
        train(small_cfg(f"model.init_from={tmp_path / 'none'}"), tmp_path / "x", progress=False)


class _Kill(Exception):
    pass


def test_resume_after_a_kill_is_bitwise_identical(tmp_path):
    # Dropout, stochastic depth, augmentation and mixup all draw random numbers.
    extra = [
        "model.overrides.drop_rate=0.1",
        "model.overrides.drop_path_rate=0.2",
        "data.augment=light",
        "train.mixup=0.4",
        "diagnostics.every=4",
    ]
    full = train(small_cfg(*extra), tmp_path / "full", progress=False)

    def kill(row):
        if row["kind"] == "step" and row["step"] == 10:  # 2 steps into epoch 3
            raise _Kill

    with pytest.raises(_Kill):
        train(small_cfg(*extra), tmp_path / "cut", progress=False, callbacks=[kill])
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 2
    assert max(r["step"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == 10
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0

    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert comparable(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == comparable(
        read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    )
    resumed = yaml.safe_load((tmp_path / "cut" / "summary.json").read_text())
    assert resumed["final_val_acc"] == full["final_val_acc"] and resumed["steps"] == 12


class _NanAfter(nn.Module):
    """Finite logits for the first ``after`` training forwards, then NaN."""

    def __init__(self, after: int, img_size=8, in_chans=1, num_classes=4) -> None:
        super().__init__()
        self.after, self.calls = after, 0
        self.fc = nn.Linear(in_chans * img_size * img_size, num_classes)

    def forward(self, x):
        if self.training:
            self.calls += 1
        out = self.fc(x.flatten(1))
        return out * float("nan") if self.training and self.calls > self.after else out


@register_model("_test_nan_after_5")
def _nan_model(activation="softmax", **kw):
    return _NanAfter(5, **kw)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--set",
            *SMALL,
            "model.name=_test_nan_after_5",
            "model.overrides={}",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "diverged: loss is nan at step 6 (epoch 2" in err and "keeps the weights after epoch 1" in err
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert summary["diverged"] is True and summary["diverged_step"] == 6 and summary["steps"] == 5
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert read_jsonl(out / "metrics.jsonl")[-1]["diverged_step"] == 6


def test_unscaled_cube_diverges_where_softmax_does_not(tmp_path):
    # 64 tokens, no clipping, no warmup, lr 1: softmax stays finite, x^3 blows up within a few steps.
    hard = ["model.overrides.patch_size=1", "train.lr=1", "train.grad_clip=0", "train.warmup_epochs=0"]
    soft = train(small_cfg("model.activation=softmax", *hard), tmp_path / "softmax", progress=False)
    assert not soft["diverged"]
    cube = train(small_cfg("model.activation=x^3", *hard), tmp_path / "cube", progress=False)
    assert cube["diverged"] and cube["diverged_step"] <= 12
    assert f"at step {cube['diverged_step']}" in cube["diverged_message"]
    assert "activation x^3" in cube["diverged_message"] and "x^3/sqrt(N)" in cube["diverged_message"]


def test_norm_rows_every_k_steps(tmp_path):
    out = tmp_path / "run"
    train(small_cfg("diagnostics.every=3", "train.epochs=2"), out, progress=False)
    norms = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "norms"]
    assert sorted({r["step"] for r in norms}) == [0, 3, 6]
    assert {r["name"] for r in norms} == {"blocks.0.attn", "blocks.1.attn"}
    assert len(norms) == 3 * 2 * 2  # steps x layers x heads
    assert all(r["fro"] > 0 and r["jac_fro"] > 0 for r in norms)


# --- command line ---------------------------------------------------------------------------
def test_cli_errors_and_print_config(tmp_path, capsys):
    assert main(["train", "--set", "train.epoch=3"]) == 2
    assert "unknown config key train.epoch" in capsys.readouterr().err
    assert main(["train", "--set", "data.name=tiny_imagenet", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "data.root is not set" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "none")]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--config",
                str(REPO / "configs" / "digits_vit_micro.yaml"),
                "--print-config",
                "--set",
                "train.epochs=2",
            ]
        )
        == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 2 and printed["model"]["name"] == "vit_micro"


def test_model_overrides_conflicting_with_the_data_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.overrides.img_size=16 conflicts.*data.image_size"):
        train(small_cfg("model.overrides.img_size=16"), tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="cannot build model 'vit_micro'"):
        train(small_cfg("model.overrides.bogus=1"), tmp_path / "s", progress=False)


# --- distributed ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_match_one_process(tmp_path):
    # The setting goes in as --set overrides, not as a dump of the resolved config:
    # this process may hold test-only config sections the workers do not know.
    # fp32 on every CPU: under bf16 autocast (auto on a CPU with native bf16) half batches round
    # differently from whole ones by far more than the tolerance below, which is about the batch dealing.
    overrides = [*SMALL, "train.epochs=2", "train.amp=off"]
    cfg = load_config(None, overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "polyattn",
        "train",
        "--set",
        *overrides,
        "--out",
        str(tmp_path / "ddp"),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[:6000]
    assert proc.stdout.count("best val acc") == 1  # only rank 0 reports
    single = train(cfg, tmp_path / "single", progress=False)

    ddp_summary = yaml.safe_load((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp_summary["world_size"] == 2 and single["world_size"] == 1
    a = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=False)
    assert len(a["rng"]) == 2
    for k in b["model"]:
        # Adam turns rounding noise in near-zero gradients (the key bias under softmax) into
        # lr-sized steps, so the tolerance is a few lr-sized steps, not machine precision.
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-3, atol=2e-4, msg=k)
    rows_a = [r for r in read_jsonl(tmp_path / "ddp" / "metrics.jsonl") if r["kind"] == "epoch"]
    rows_b = [r for r in read_jsonl(tmp_path / "single" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert len(rows_a) == len(rows_b) == 2  # rank 1 wrote nothing
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["val_acc"] == pytest.approx(rb["val_acc"]) and ra["train_loss"] == pytest.approx(
            rb["train_loss"], rel=1e-4
        )


def test_resolve_config_accepts_partial_dicts():
    cfg = resolve_config({"train": {"epochs": 2}})
    assert cfg["train"]["epochs"] == 2 and cfg["train"]["batch_size"] == 64
    with pytest.raises(ConfigError, match="config section 'train' must be a mapping"):
        resolve_config({"train": 3})
