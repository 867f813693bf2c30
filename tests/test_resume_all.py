"""Each long-running command, stopped part-way and resumed, ends with the numbers of a run never stopped.

The stop is a KeyboardInterrupt raised inside the process after a checkpoint, as a Ctrl-C would arrive.
"""

from __future__ import annotations

import json

import pytest
import torch

from polyattn.cli import main
from polyattn.experiments import compare as compare_mod
from polyattn.utils.io import read_jsonl
from synthetic_setting import TIMING_KEYS

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
    argv += ["data.num_kv_pairs=2", "data.vocab_size=16", "train.epochs=2", "train.batch_size=16", "model.overrides.dim=16"]
    argv += [f"train.log_every={log_every}"]
    stopped_at = _grid_resume_matches(tmp_path, monkeypatch, capsys, argv, "T16", ["softmax-s0", "x2_divsqrtN-s0"])
    assert stopped_at == (5 if log_every == 1 else 8)
