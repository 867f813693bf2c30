"""Model selection on validation (train.select), the one-cycle schedule and the LRA protocols."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from synthetic_setting import TIMING_KEYS, comparable, synthetic_run

from polyattn.cli import main
from polyattn.data.registry import build_dataset
from polyattn.experiments.lra import (
    PROTOCOLS,
    TASKS,
    is_full_scale,
    lra_config,
    lra_protocol,
    write_lra_configs,
)
from polyattn.models import create_model, register_model
from polyattn.models.lra import LRAEncoder
from polyattn.training import ConfigError, load_config, load_run, train
from polyattn.training.config import grid_points
from polyattn.training.trainer import onecycle_at
from polyattn.utils import RunDirError, read_jsonl

REPO = Path(__file__).resolve().parents[1]

# 64 synthetic 8x8 images, 4 steps per epoch, 4 epochs, a linear model (below): well under a second per run.
RUN = synthetic_run(
    40,
    "data.num_test=40",
    "data.augment=light",
    "model.name=_select_peak_at_8",
    "train.epochs=4",
    "train.lr=0.05",
    "train.weight_decay=0",
)


class _PeakAt8(nn.Module):
    """A linear classifier that evaluates as its own argmin except after exactly 8 training forwards.

    With 4 steps per epoch, the validation accuracy of epoch 2 is the learned classifier's and that
    of epochs 1, 3 and 4 is the argmin's: an improvement, then a degradation, by construction. The
    counter is a buffer, so a checkpoint carries it and reproduces the evaluation it was saved at.
    """

    def __init__(self, img_size=8, in_chans=1, num_classes=4) -> None:
        super().__init__()
        self.fc = nn.Linear(in_chans * img_size * img_size, num_classes)
        self.drop = nn.Dropout(0.2)  # draws random numbers, so resume exactness covers the RNG states
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.forwards += 1
            return self.fc(self.drop(x.flatten(1)))
        logits = self.fc(x.flatten(1))
        return logits if int(self.forwards) == 8 else -logits


register_model("_select_peak_at_8")(lambda activation="softmax", **kw: _PeakAt8(**kw))


def cfg_of(*extra: str) -> dict:
    return load_config(None, RUN + list(extra))


def test_accuracy(model: nn.Module, cfg: dict) -> float:
    """Test accuracy computed here, independently of the trainer's evaluation."""
    test = build_dataset(cfg["data"], cfg["train"]["seed"]).test
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[None]).argmax(-1) == y).sum()) for x, y in test)
    return correct / len(test)


test_accuracy.__test__ = False  # a helper, not a test


# --- A. train.select ---------------------------------------------------------------------------
def test_best_val_selects_the_best_epoch_and_scores_test_with_its_weights(tmp_path):
    cfg = cfg_of("train.select=best_val")
    s = train(cfg, tmp_path / "best", progress=False)
    vals = [r["val_acc"] for r in read_jsonl(tmp_path / "best" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert len(vals) == 4 and vals[1] > max(vals[0], vals[2], vals[3])  # improvement, then degradation
    assert s["select"] == "best_val" and s["selected_epoch"] == vals.index(max(vals)) + 1 == 2
    assert s["selected_val_acc"] == s["best_val_acc"] == max(vals) and s["final_val_acc"] == vals[-1]
    best = torch.load(tmp_path / "best" / "checkpoints" / "best.pt", weights_only=False)
    assert (best["epoch"], best["step"], best["val"]["acc"]) == (2, 8, max(vals))
    # test_acc is that of the best weights, test_acc_last that of the final ones: recomputed here.
    model, _ = load_run(tmp_path / "best", checkpoint="best")
    assert s["test_acc"] == test_accuracy(model, cfg)
    model, _ = load_run(tmp_path / "best")
    assert s["test_acc_last"] == test_accuracy(model, cfg)
    assert s["test_acc"] > s["test_acc_last"]
    # last.pt keeps the final weights and records the best evaluation.
    last = torch.load(tmp_path / "best" / "checkpoints" / "last.pt", weights_only=False)
    assert last["epoch"] == 4 and last["best"]["epoch"] == 2 and int(last["model"]["forwards"]) == 16

    # select=last (the default): today's numbers, the final weights, no best.pt.
    s_last = train(cfg_of(), tmp_path / "last", progress=False)
    assert s_last["select"] == "last" and s_last["selected_epoch"] == 4
    assert s_last["test_acc"] == s_last["test_acc_last"] == s["test_acc_last"]
    assert s_last["best_val_acc"] == s["best_val_acc"] and s_last["selected_val_acc"] == vals[-1]
    assert not (tmp_path / "last" / "checkpoints" / "best.pt").exists()
    with pytest.raises(FileNotFoundError, match="train.select=best_val"):
        load_run(tmp_path / "last", checkpoint="best")


def test_without_a_test_split_both_test_accuracies_are_null(tmp_path):
    s = train(cfg_of("train.select=best_val", "data.num_test=0"), tmp_path / "r", progress=False)
    assert s["test_acc"] is None and s["test_acc_last"] is None and s["selected_epoch"] == 2


class _Kill(Exception):
    pass


def _kill_at(kind: str, key: str, value: int):
    def callback(row):
        if row["kind"] == kind and row[key] == value:
            raise _Kill

    return callback


def _same_run(a: Path, b: Path) -> None:
    for name in ("last.pt", "best.pt"):
        x = torch.load(a / "checkpoints" / name, weights_only=False)
        y = torch.load(b / "checkpoints" / name, weights_only=False)
        assert x["model"].keys() == y["model"].keys()
        for k in x["model"]:
            assert torch.equal(x["model"][k], y["model"][k]), (name, k)
        assert (x["epoch"], x["step"]) == (y["epoch"], y["step"]), name
    assert comparable(read_jsonl(a / "metrics.jsonl")) == comparable(read_jsonl(b / "metrics.jsonl"))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {k: v for k, v in sa.items() if k not in TIMING_KEYS} == {
        k: v for k, v in sb.items() if k not in TIMING_KEYS
    }


def test_resume_with_best_val_is_exact(tmp_path):
    extra = ("train.select=best_val", "train.schedule=onecycle_linear")
    full = tmp_path / "full"
    train(cfg_of(*extra), full, progress=False)

    # Killed in epoch 3: the best evaluation (epoch 2) is in last.pt's state and best.pt.
    cut = tmp_path / "cut"
    with pytest.raises(_Kill):
        train(cfg_of(*extra), cut, progress=False, callbacks=[_kill_at("step", "step", 10)])
    assert torch.load(cut / "checkpoints" / "last.pt", weights_only=False)["best"]["epoch"] == 2
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    _same_run(full, cut)

    # Stopped after last.pt of epoch 2 was written but before best.pt: best.pt still holds epoch 1.
    gap = tmp_path / "gap"
    side = tmp_path / "best_epoch1.pt"

    def keep_epoch1(row):
        if row["kind"] == "epoch" and row["epoch"] == 1:
            shutil.copy(gap / "checkpoints" / "best.pt", side)

    with pytest.raises(_Kill):
        train(cfg_of(*extra), gap, progress=False, callbacks=[keep_epoch1, _kill_at("epoch", "epoch", 2)])
    shutil.copy(side, gap / "checkpoints" / "best.pt")
    assert torch.load(gap / "checkpoints" / "best.pt", weights_only=False)["epoch"] == 1
    train(cfg_of(*extra), gap, resume=True, progress=False)
    _same_run(full, gap)


def test_resume_refuses_a_lost_best_checkpoint_and_a_changed_select(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(_Kill):
        train(cfg_of("train.select=best_val"), run, progress=False, callbacks=[_kill_at("epoch", "epoch", 3)])
    with pytest.raises(RunDirError, match=r"train.select: 'best_val' -> 'last'"):
        train(cfg_of("train.select=last"), run, resume=True, progress=False)
    (run / "checkpoints" / "best.pt").unlink()
    with pytest.raises(RunDirError, match=r"best.pt does not hold the weights of the best evaluation \(epoch 2"):
        train(cfg_of("train.select=best_val"), run, resume=True, progress=False)


def test_runs_from_before_select_and_schedule_resume_unchanged(tmp_path):
    """A checkpoint whose config lacks the two keys trained with their defaults: nothing is reported changed."""
    run = tmp_path / "run"
    with pytest.raises(_Kill):
        train(cfg_of(), run, progress=False, callbacks=[_kill_at("epoch", "epoch", 2)])
    path = run / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    for key in ("select", "schedule"):
        del ckpt["config"]["train"][key]
    del ckpt["best"]
    torch.save(ckpt, path)
    s = train(cfg_of(), run, resume=True, progress=False)
    assert s["config_changes"] == [] and s["steps"] == 16


# --- B4. train.schedule=onecycle_linear ---------------------------------------------------------------
def _torch_onecycle(lr: float, warmup: int, total: int) -> list[tuple[float, float]]:
    """(lr, beta1) of every update under torch's OneCycleLR as the Nystromformer LRA code builds it."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optimizer=opt, max_lr=lr, pct_start=warmup / total, anneal_strategy="linear", total_steps=total
    )
    out = []
    for step in range(total):
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        opt.step()
        if step < total - 1:  # after the last update OneCycleLR would extrapolate (or divide by zero)
            sched.step()
    return out


@pytest.mark.parametrize("warmup, total", [(1000, 5000), (312, 2000), (175, 700), (3, 12), (0, 20), (20, 20)])
def test_onecycle_linear_matches_torch_step_by_step(warmup, total):
    expected = _torch_onecycle(1e-4, warmup, total)
    got = [onecycle_at(s, 1e-4, warmup, total) for s in range(total)]
    assert got == expected  # the same arithmetic: equal, not merely close
    # Past the last update the values hold (OneCycleLR would extrapolate below its final lr).
    assert onecycle_at(total, 1e-4, warmup, total) == onecycle_at(total - 1, 1e-4, warmup, total)


def test_onecycle_linear_in_the_trainer_matches_torch(tmp_path):
    s = train(cfg_of("train.schedule=onecycle_linear", "train.warmup_steps=3"), tmp_path / "r", progress=False)
    assert s["steps"] == 16
    expected = _torch_onecycle(0.05, 3, 16)
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "step"]
    assert lrs == pytest.approx([lr for lr, _ in expected], rel=1e-12, abs=0)
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    assert {g["betas"][0] for g in ckpt["optimizer"]["param_groups"]} == {expected[-1][1]}
    assert {g["betas"][1] for g in ckpt["optimizer"]["param_groups"]} == {0.999}
    with pytest.raises(ConfigError, match="train.min_lr=1e-05 applies to train.schedule=cosine only"):
        train(cfg_of("train.schedule=onecycle_linear", "train.min_lr=1e-5"), tmp_path / "bad", progress=False)
    with pytest.raises(ConfigError, match="train.schedule must be one of"):
        cfg_of("train.schedule=linear")


def test_a_resume_can_switch_the_schedule_from_its_step_on(tmp_path):
    run = tmp_path / "run"
    train(cfg_of("train.epochs=2"), run, progress=False)
    s = train(cfg_of("train.schedule=onecycle_linear"), run, resume=True, progress=False)
    assert s["config_changes"][0]["changed"]["train.schedule"] == ["cosine", "onecycle_linear"]
    expected = _torch_onecycle(0.05, 4, 16)  # warmup_epochs=1: 4 steps
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step" and r["step"] > 8]
    assert [r["lr"] for r in rows] == pytest.approx([lr for lr, _ in expected[8:]], rel=1e-12, abs=0)


# --- B1, B2. the nystromformer protocol in the LRA encoder ---------------------------------------
def _nystromformer_by_hand(enc: LRAEncoder, tokens: torch.Tensor) -> torch.Tensor:
    """LRA/code: mask = ids != 0; softmax(QK^T/sqrt(d) - 1e6 (1 - mask)); norm(X) * mask; mean over L."""
    mask = (tokens != 0).float()
    b, n = tokens.shape
    x = enc.token_embed(tokens) + enc.pos_embed(torch.arange(n))
    for blk in enc.blocks:
        attn = blk.attn
        q, k, v = (
            t.view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2) for t in attn.qkv(blk.norm1(x)).chunk(3, -1)
        )
        dot = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim) - 1e6 * (1 - mask[:, None, None, :])
        out = (torch.softmax(dot, -1) @ v).transpose(1, 2).reshape(b, n, -1)
        x = x + attn.proj(out)
        x = x + blk.mlp(blk.norm2(x))
    return (enc.norm(x) * mask[:, :, None]).mean(1)


def test_nystromformer_protocol_masks_token_0_and_pools_over_the_padded_length():
    torch.manual_seed(0)
    kw = {"dim": 8, "depth": 2, "num_heads": 2, "mlp_dim": 16, "dropout": 0.0, "attn_drop": 0.0}
    enc = LRAEncoder(7, 8, "softmax", protocol="nystromformer", **kw).eval()
    # a 0 inside a sequence (a black pixel) is masked too; trailing zeros are the padding
    tokens = torch.tensor([[3, 0, 5, 2, 6, 0, 0, 0], [1, 4, 4, 0, 2, 0, 0, 0], [5, 5, 5, 5, 5, 5, 5, 1]])
    with torch.no_grad():
        hand = _nystromformer_by_hand(enc, tokens)
        torch.testing.assert_close(enc(tokens), hand, atol=1e-6, rtol=0)
        # ... with or without the data's (trailing) padding mask, which only trims the batch
        trailing = torch.arange(8)[None] >= torch.tensor([5, 5, 8])[:, None]
        torch.testing.assert_close(enc(tokens, trailing), hand, atol=1e-6, rtol=0)
        # the same weights under polyattn: the given mask, and the mean of the valid tokens
        poly = LRAEncoder(7, 8, "softmax", **kw).eval()
        poly.load_state_dict(enc.state_dict())
        zero = tokens == 0
        valid = (~zero).sum(1, keepdim=True)
        torch.testing.assert_close(poly(tokens, zero) * valid / 8, hand, atol=1e-6, rtol=0)
        assert not torch.allclose(poly(tokens, trailing), enc(tokens, trailing), atol=1e-3)


def test_nystromformer_padded_length_and_padding_invariance():
    # The lengths the Nystromformer LRA data are padded to (LRA/datasets/*.py): 2000+48, 1000+24, 4000+96, 1024.
    for max_len, padded in ((2000, 2048), (1000, 1024), (4000, 4096), (1024, 1024), (100, 128), (1, 1)):
        assert LRAEncoder(4, max_len, protocol="nystromformer", dim=8, num_heads=2).padded_len == padded
    torch.manual_seed(1)
    for activation in ("softmax", "x^3/14", "x^3/sqrt(N)"):
        model = create_model(
            "lra_encoder", activation, vocab_size=9, max_len=40, num_classes=3, protocol="nystromformer"
        )
        model.eval()
        tokens = torch.randint(0, 9, (3, 24))
        with torch.no_grad():
            ref = model(tokens)
            longer = torch.cat([tokens, torch.zeros(3, 16, dtype=torch.long)], 1)
            torch.testing.assert_close(model(longer), ref, atol=1e-6, rtol=0)
            mask = torch.cat([torch.zeros(3, 24, dtype=torch.bool), torch.ones(3, 16, dtype=torch.bool)], 1)
            torch.testing.assert_close(model(longer, mask), ref, atol=1e-6, rtol=0)
    dual = create_model("lra_dual_encoder", vocab_size=9, max_len=16, protocol="nystromformer")
    assert dual.encoder.protocol == "nystromformer" and dual.encoder.padded_len == 16
    with pytest.raises(ValueError, match="protocol must be one of"):
        create_model("lra_encoder", vocab_size=9, max_len=16, protocol="bert")


# --- B. lra_config and the grid files ----------------------------------------------------------
def test_lra_config_defaults_to_the_nystromformer_protocol():
    for task in TASKS:
        cfg = lra_config(task)
        assert cfg["model"]["overrides"] == {"protocol": "nystromformer"}, task
        assert (cfg["train"]["schedule"], cfg["train"]["select"]) == ("onecycle_linear", "best_val"), task
        assert lra_protocol(cfg) == "nystromformer" and is_full_scale(cfg), task
        poly = lra_config(task, protocol="polyattn")
        assert lra_protocol(poly) == "polyattn" and is_full_scale(poly), task
        assert (poly["train"]["schedule"], poly["train"]["select"]) == ("cosine", "last"), task
    cpu = lra_config("listops", preset="cpu")
    assert lra_protocol(cpu) == "polyattn"
    assert lra_protocol(lra_config("listops", preset="cpu", protocol="nystromformer")) == "nystromformer"
    assert lra_protocol(lra_config("listops", overrides=["train.select=last"])) == "custom"
    assert set(PROTOCOLS) == {"nystromformer", "polyattn"}
    with pytest.raises(ValueError, match="unknown LRA protocol"):
        lra_config("listops", protocol="bert")


def test_grid_files_match_write_lra_configs_and_carry_the_protocol(tmp_path):
    for path in write_lra_configs(tmp_path):
        repo_file = REPO / "configs" / "lra" / path.name
        assert yaml.safe_load(repo_file.read_text()) == yaml.safe_load(path.read_text()), path.name
    for grid, protocol in (("table4.yaml", "nystromformer"), ("cpu.yaml", "polyattn")):
        path = REPO / "configs" / "lra" / grid
        for name in grid_points(path):
            assert lra_protocol(load_config(path, point=name)) == protocol, name


def test_polyattn_lra_with_the_nystromformer_protocol_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POLYATTN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["lra", "--task", "listops", "--preset", "cpu", "--protocol", "nystromformer", "--out", str(out)]
    tiny = ["data.num_train=96", "data.num_val=32", "data.num_test=32", "data.max_len=40", "data.gen_max_length=40"]
    tiny += ["train.epochs=3", "train.warmup_steps=2", "train.num_threads=1"]
    assert main([*argv, "--no-progress", "--set", *tiny]) == 0
    result = json.loads((out / "lra_result.json").read_text())
    assert result["protocol"] == "nystromformer" and 1 <= result["selected_epoch"] <= 3
    assert (out / "checkpoints" / "best.pt").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert result["test_acc"] == summary["test_acc"] and result["test_acc_last"] == summary["test_acc_last"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["overrides"]["protocol"] == "nystromformer"
    assert "protocol" in capsys.readouterr().out
    assert main(["lra", "--table", str(out)]) == 0
    assert "| nystromformer |" in capsys.readouterr().out
    assert main(["lra", "--resume", "--out", str(out), "--protocol", "polyattn"]) == 2
