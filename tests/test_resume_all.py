"""Each long-running command, stopped part-way and resumed, ends with the numbers of a run never stopped.

The stop is a KeyboardInterrupt raised inside the process after a checkpoint, as a Ctrl-C would arrive.
"""

from __future__ import annotations

import json

import pytest
import torch
from synthetic_setting import TIMING_KEYS, TINY_DETECT

from polyattn.cli import main
from polyattn.training import grid as compare_mod
from polyattn.utils.io import read_jsonl

# Run records that differ between a resumed run and a straight one by design.
_RUN_KEYS = TIMING_KEYS | {"status"}


def _runs(results: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in _RUN_KEYS} for r in results["runs"]]


def _epoch_rows(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(run_dir / "metrics.jsonl")]


def _kill_run(monkeypatch, which: int) -> None:
    """The ``which``-th run a grid trains stops at its first row after epoch 1 (its checkpoint is written)."""
    real = compare_mod.train
    calls = {"n": 0}

    def train(cfg, run_dir, **kw):
        calls["n"] += 1
        if calls["n"] == which:
            seen = {"epoch1": False}

            def kill(row):
                if seen["epoch1"]:
                    raise KeyboardInterrupt
                seen["epoch1"] = row["kind"] == "epoch" and row["epoch"] == 1

            kw["callbacks"] = [*kw.get("callbacks", []), kill]
        return real(cfg, run_dir, **kw)

    monkeypatch.setattr(compare_mod, "train", train)


def _grid_resume_matches(tmp_path, monkeypatch, capsys, argv: list[str], sub: str, names: list[str]) -> int:
    """Straight grid vs the same grid with its second run stopped and then resumed; the step it stopped at."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*argv, "--out", str(full)]) == 0
    with monkeypatch.context() as m:
        _kill_run(m, 2)
        assert main([*argv, "--out", str(cut)]) == 130
    assert "--resume" in capsys.readouterr().err
    killed = cut / sub / "runs" / names[1]
    assert not (killed / "summary.json").exists()
    stopped_at = max(r["step"] for r in read_jsonl(killed / "metrics.jsonl"))
    assert main([*argv, "--out", str(cut), "--resume"]) == 0
    capsys.readouterr()
    a = json.loads((full / sub / "results.json").read_text())
    b = json.loads((cut / sub / "results.json").read_text())
    assert [r["status"] for r in b["runs"]][:2] == ["reused", "resumed"]
    assert stopped_at <= b["runs"][1]["steps"]
    assert _runs(a) == _runs(b)
    assert a["table"] == b["table"]
    for name in names:
        assert _epoch_rows(full / sub / "runs" / name) == _epoch_rows(cut / sub / "runs" / name), name
    return stopped_at


def test_sweep_resume_after_a_kill_matches_a_straight_run(tmp_path, monkeypatch, capsys):
    argv = ["sweep", "--scales", "8", "--patch-sizes", "8", "--epochs", "2", "--no-progress", "--jobs", "1"]
    # A step row every step: the stop comes one step into epoch 2, with epoch 1's checkpoint on disk.
    argv += ["--set", "model.overrides.depth=1", "model.overrides.dim=32", "train.log_every=1"]
    names = ["p8-x3_div8-s0", "p8-softmax-s0"]
    stopped_at = _grid_resume_matches(tmp_path, monkeypatch, capsys, argv, ".", names)
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    assert stopped_at == full["runs"][1]["steps"] // 2 + 1


@pytest.mark.parametrize("log_every", [1, 10])
def test_recall_resume_after_a_kill_matches_a_straight_run(tmp_path, monkeypatch, capsys, log_every):
    # log_every 1 stops one step into epoch 2; 10 (no step row in these 4-step epochs) stops after the last
    # checkpoint but before summary.json, so the resume trains no step at all.
    argv = ["recall", "--activations", "softmax,x^2/sqrt(N)", "--seeds", "1", "--seq-lens", "16", "--jobs", "1"]
    argv += ["--no-progress", "--norm-every", "0", "--set", "data.num_train=64", "data.num_val=32"]
    argv += [
        "data.num_kv_pairs=2",
        "data.vocab_size=16",
        "train.epochs=2",
        "train.batch_size=16",
        "model.overrides.dim=16",
    ]
    argv += [f"train.log_every={log_every}"]
    stopped_at = _grid_resume_matches(tmp_path, monkeypatch, capsys, argv, "T16", ["softmax-s0", "x2_divsqrtN-s0"])
    assert stopped_at == (5 if log_every == 1 else 8)


def _kill_trainer_after_epoch_1(monkeypatch) -> None:
    """The next trainer run stops one step into epoch 2 (log_every 1), epoch 1's checkpoint on disk."""
    from polyattn.training import trainer

    real = trainer.train

    def train(cfg, run_dir, **kw):
        seen = {"epoch1": False}

        def kill(row):
            if seen["epoch1"]:
                raise KeyboardInterrupt
            seen["epoch1"] = row["kind"] == "epoch" and row["epoch"] == 1

        return real(cfg, run_dir, **{**kw, "callbacks": [*kw.get("callbacks", []), kill]})

    monkeypatch.setattr(trainer, "train", train)


def test_lra_resume_after_a_kill_matches_a_straight_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POLYATTN_CACHE", str(tmp_path / "cache"))
    argv = ["lra", "--task", "listops", "--activation", "x^3/14", "--preset", "cpu", "--no-progress", "--set"]
    argv += ["data.num_train=96", "data.num_val=32", "data.num_test=32", "data.max_len=40", "data.gen_max_length=40"]
    argv += ["train.epochs=2", "train.warmup_steps=2", "train.num_threads=1", "train.log_every=1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*argv, "--out", str(full)]) == 0
    with monkeypatch.context() as m:
        _kill_trainer_after_epoch_1(m)
        assert main([*argv, "--out", str(cut)]) == 130
    assert not (cut / "lra_result.json").exists()
    assert max(r["step"] for r in read_jsonl(cut / "metrics.jsonl")) == 4  # one step into epoch 2 of 3 steps
    assert main([*argv, "--out", str(cut), "--resume"]) == 0
    capsys.readouterr()
    a = json.loads((full / "lra_result.json").read_text())
    b = json.loads((cut / "lra_result.json").read_text())
    assert a["steps"] == 6 and a["test_acc"] is not None
    assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == {k: v for k, v in b.items() if k not in TIMING_KEYS}
    assert _epoch_rows(full) == _epoch_rows(cut)


def test_pinn_resume_after_a_kill_matches_a_straight_run(tmp_path, monkeypatch):
    from polyattn.experiments.pinn import loop
    from polyattn.experiments.pinn.config import resolve_pinn_config

    over = {
        "pde.name": "convection",
        "model.activation": "x^3/sqrt(N)",
        "data.train_grid": [7, 7],
        "data.test_grid": [11, 11],
        "model.d_ff": 8,
        "model.d_hidden": 8,
        "model.mlp_hidden": 8,
        "train.max_steps": 4,
        "train.lbfgs_max_iter": 3,
        "train.checkpoint_every": 2,
        "train.num_threads": 1,
    }
    cfg = resolve_pinn_config(None, over)
    a = loop.run_pinn(cfg, tmp_path / "full", progress=False, plots=False)

    # Stop inside step 3's L-BFGS closure, after step 2's checkpoint: the evaluations of the stopped
    # step are lost with it and redone.
    real_loss, real_checkpoint = loop.pinn_loss, loop._checkpoint
    saved = {"n": 0}

    def checkpoint(*args):
        real_checkpoint(*args)
        saved["n"] += 1

    def loss(*args):
        if saved["n"]:
            raise KeyboardInterrupt
        return real_loss(*args)

    with monkeypatch.context() as m:
        m.setattr(loop, "pinn_loss", loss)
        m.setattr(loop, "_checkpoint", checkpoint)
        with pytest.raises(KeyboardInterrupt):
            loop.run_pinn(cfg, tmp_path / "cut", progress=False, plots=False)
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)["step"] == 2
    assert not (tmp_path / "cut" / "metrics.json").exists()
    b = loop.run_pinn(cfg, tmp_path / "cut", resume=True, progress=False, plots=False)
    drop = {"train_time_s", "time_s", "run_dir", "record"}
    assert a["steps"] == 4 and a["history"][0]["loss"] > a["final_loss"]
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    pa = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)["model"]
    pb = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_detect_resume_after_a_kill_matches_a_straight_run(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    pytest.importorskip("pycocotools")
    from polyattn.experiments.detection import loop
    from polyattn.experiments.detection.config import resolve_detect_config

    tiny = [*TINY_DETECT, "train.epochs=2"]
    cfg = resolve_detect_config(None, tiny, preset="cpu")
    a = loop.run_detect(cfg, tmp_path / "full", progress=False)

    real = loop.build_detector

    def stops_at_step_4(cfg, num_classes):
        model = real(cfg, num_classes)
        forward, calls = model.forward, {"n": 0}

        def counted(images, targets=None):
            if model.training:
                calls["n"] += 1
                if calls["n"] == 4:  # the first step of epoch 2, epoch 1's checkpoint on disk
                    raise KeyboardInterrupt
            return forward(images, targets)

        model.forward = counted
        return model

    with monkeypatch.context() as m:
        m.setattr(loop, "build_detector", stops_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            loop.run_detect(cfg, tmp_path / "cut", progress=False)
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)["step"] == 3
    b = loop.run_detect(cfg, tmp_path / "cut", resume=True, progress=False)
    assert a["steps"] == 6 and a["epochs"] == 2
    drop = {"time_s"}
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    ha = json.loads((tmp_path / "full" / "history.json").read_text())
    hb = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in ha] == [
        {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in hb
    ]
    sa = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)["model"]
    sb = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
