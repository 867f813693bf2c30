"""Runs that never lie: run-directory locks, honest resume, clear errors, file modes, interrupts."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from synthetic_setting import small_vit, synthetic_run

from polyattn.cli import main
from polyattn.models import register_model
from polyattn.training import load_config, train
from polyattn.training.trainer import lr_at
from polyattn.utils import RunDirError, RunDirLock, RunLockedError, read_jsonl
from polyattn.utils.rundir import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]

# 64 synthetic 8x8 images, 4 steps per epoch, a 1-block model: about a second per run.
TINY = synthetic_run(16, *small_vit(1, 16), "train.epochs=2")


def tiny(*extra: str) -> dict:
    return load_config(None, TINY + list(extra))


def cli_train(out: Path, *extra: str) -> int:
    return main(["train", "--set", *TINY, *extra, "--out", str(out), "--no-progress"])


def cli_resume(run: Path, *sets: str) -> int:
    return main(["train", "--resume", str(run), "--no-progress", *(["--set", *sets] if sets else [])])


# --- 1. one run per directory -------------------------------------------------------------
def test_a_locked_run_directory_is_refused_with_the_holders_pid(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from polyattn.utils.rundir import RunDirLock; "
            f"RunDirLock({str(out)!r}, 'holder').acquire(); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli_train(out) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "in use" in err and "another --out" in err
        assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is gone with it, the lock file is not.
    assert (out / LOCK_NAME).exists()
    assert cli_train(out) == 0
    assert (out / "summary.json").is_file()


def test_every_command_that_writes_a_run_directory_takes_the_lock(tmp_path):
    from polyattn.experiments.compare import compare
    from polyattn.experiments.lra import lra_config, run_lra
    from polyattn.experiments.pinn import resolve_pinn_config, run_pinn
    from polyattn.experiments.sweep import sweep

    out = tmp_path / "busy"
    with RunDirLock(out, "test"):
        with pytest.raises(RunLockedError, match="in use by pid"):
            train(tiny(), out, progress=False)
        with pytest.raises(RunLockedError):
            compare(out, activations=["softmax"], seeds=1, overrides=TINY, figures=False, progress=False)
        with pytest.raises(RunLockedError):
            sweep(out, scales=[1], patch_sizes=[4], seeds=1, overrides=TINY, progress=False)
        with pytest.raises(RunLockedError):
            run_lra(lra_config("listops", preset="cpu"), out, progress=False)
        with pytest.raises(RunLockedError):
            run_pinn(resolve_pinn_config(None, quick=True), out, progress=False, plots=False)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_a_finished_run_releases_its_lock(tmp_path):
    train(tiny("train.epochs=1"), tmp_path / "r", progress=False)
    with RunDirLock(tmp_path / "r"):  # would raise if the trainer still held it
        pass
    assert (tmp_path / "r" / LOCK_NAME).read_text() == ""


# --- 2. config changes on resume ---------------------------------------------------------------
def test_resume_applies_changed_optimizer_settings_and_records_them(tmp_path):
    run = tmp_path / "run"
    assert cli_train(run, "train.lr=1e-3", "train.weight_decay=0.05") == 0
    assert cli_resume(run, "train.epochs=4", "train.lr=4e-4", "train.weight_decay=0.01", "train.betas=[0.8,0.9]") == 0
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    decay, no_decay = ckpt["optimizer"]["param_groups"]
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert tuple(decay["betas"]) == (0.8, 0.9)
    assert ckpt["scheduler"]["base_lrs"] == [4e-4, 4e-4]
    # Every update after the resume ran at the new schedule's rate (16 steps, 4 warmup, lr 4e-4).
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step" and r["step"] > 8]
    assert [r["step"] for r in rows] == list(range(9, 17))
    for r in rows:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, 4e-4, 0.0, 4, 16), rel=1e-12)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 4e-4 and saved["train"]["weight_decay"] == 0.01
    resume_rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "resume"]
    assert len(resume_rows) == 1 and resume_rows[0]["step"] == 8
    assert resume_rows[0]["changed"]["train.lr"] == [1e-3, 4e-4]
    summary = yaml.safe_load((run / "summary.json").read_text())
    assert summary["config_changes"][0]["changed"]["train.weight_decay"] == [0.05, 0.01]


def test_resume_refuses_keys_it_cannot_change(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_train(run) == 0
    before = (run / "metrics.jsonl").read_text(), (run / "config.yaml").read_text()
    capsys.readouterr()
    for key, value in (("train.batch_size", "8"), ("model.overrides.depth", "2"), ("data.num_train", "32")):
        assert cli_resume(run, "train.epochs=3", f"{key}={value}") == 2
        err = capsys.readouterr().err
        assert "cannot resume" in err and key.rsplit(".", 1)[0] in err and "another --out" in err
    assert ((run / "metrics.jsonl").read_text(), (run / "config.yaml").read_text()) == before


# --- 3, 4. broken or missing checkpoints ---------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "not-a-checkpoint"])
def test_unreadable_checkpoint_gives_exit_2_naming_the_file(tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert cli_train(run, "train.epochs=1") == 0
    ckpt = run / "checkpoints" / "last.pt"
    data = ckpt.read_bytes()
    if damage == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "garbage":
        ckpt.write_bytes(os.urandom(4096))
    else:
        torch.save({"weights": torch.zeros(2)}, ckpt)
    capsys.readouterr()
    assert cli_resume(run, "train.epochs=2") == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "delete" in err and "Traceback" not in err


def test_swapped_config_yaml_is_named_not_a_size_mismatch_traceback(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_train(run, "train.epochs=1") == 0
    other = yaml.safe_load((run / "config.yaml").read_text())
    other["model"]["overrides"]["dim"] = 32
    (run / "config.yaml").write_text(yaml.safe_dump(other))
    capsys.readouterr()
    assert cli_resume(run) == 2
    err = capsys.readouterr().err
    assert "model.overrides" in err and "'dim': 16" in err and "'dim': 32" in err


def test_resume_without_a_checkpoint_refuses_and_keeps_the_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_train(run, "train.epochs=1") == 0
    (run / "checkpoints" / "last.pt").unlink()
    metrics, summary = (run / "metrics.jsonl").read_bytes(), (run / "summary.json").read_bytes()
    capsys.readouterr()
    assert cli_resume(run) == 2
    err = capsys.readouterr().err
    assert "last.pt not found" in err and "without --resume" in err
    assert (run / "metrics.jsonl").read_bytes() == metrics and (run / "summary.json").read_bytes() == summary


# --- 6. bad inputs found before training leave nothing behind -----------------------------------
def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "taken.txt"
    f.write_text("mine")
    assert cli_train(f) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err
    assert f.read_text() == "mine"
    assert cli_train(f / "sub") == 2
    assert "is a file" in capsys.readouterr().err


def test_non_utf8_config_file_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("description: caf\xe9\n".encode("latin-1"))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err and str(cfg) in err and "0xe9" in err
    assert not (tmp_path / "r").exists()


def test_a_model_that_cannot_be_built_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli_train(out, "model.overrides.num_heads=3") == 2  # 16 is not divisible by 3
    assert "num_heads" in capsys.readouterr().err
    assert not out.exists()


# --- 7, 8. leftovers and file modes ------------------------------------------------------------
def test_leftover_tmp_files_are_removed_at_the_next_start(tmp_path):
    run = tmp_path / "run"
    train(tiny("train.epochs=1"), run, progress=False)
    stale = [run / "checkpoints" / ".last.pt.x1y2z3.tmp", run / ".metrics.jsonl.abc.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    keep = run / "notes.tmp"  # not an atomic-write leftover: not ours to delete
    keep.write_text("x")
    train(tiny("train.epochs=2"), run, resume=True, progress=False)
    assert not any(p.exists() for p in stale) and keep.exists()


def test_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        train(tiny("train.epochs=1"), tmp_path / "r", progress=False)
    finally:
        os.umask(old)
    for name in ("config.yaml", "summary.json", "checkpoints/last.pt", "metrics.jsonl"):
        assert stat.S_IMODE((tmp_path / "r" / name).stat().st_mode) == 0o644, name


# --- 12. divergence advice and Ctrl-C --------------------------------------------------------
class _NanAtOnce(nn.Module):
    def __init__(self, img_size=8, in_chans=1, num_classes=4) -> None:
        super().__init__()
        self.fc = nn.Linear(in_chans * img_size * img_size, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


class _CtrlCAfter(nn.Module):
    """Raises KeyboardInterrupt at the ``after``-th training forward, as Ctrl-C would."""

    def __init__(self, img_size=8, in_chans=1, num_classes=4, after: int = 6) -> None:
        super().__init__()
        self.after, self.calls = after, 0
        self.fc = nn.Linear(in_chans * img_size * img_size, num_classes)

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.after:
                raise KeyboardInterrupt
        return self.fc(x.flatten(1))


register_model("_rel_nan")(lambda activation="softmax", **kw: _NanAtOnce(**kw))
register_model("_rel_ctrl_c")(lambda activation="softmax", **kw: _CtrlCAfter(**kw))


@pytest.mark.parametrize("clip, advice", [("1.0", "a smaller train.grad_clip (it is 1 now)"), ("0", "(it is off now)")])
def test_divergence_advice_says_what_is_configured(tmp_path, capsys, clip, advice):
    code = cli_train(tmp_path / "r", "model.name=_rel_nan", "model.overrides={}", f"train.grad_clip={clip}")
    assert code == 1
    err = capsys.readouterr().err
    assert advice in err and "(it is 0.001 now)" in err


def test_ctrl_c_says_how_to_resume(tmp_path, capsys):
    run = tmp_path / "r"
    assert cli_train(run, "model.name=_rel_ctrl_c", "model.overrides={}") == 130  # 2 steps into epoch 2
    err = capsys.readouterr().err
    assert f"keeps epoch 1 (step 4); continue with: polyattn train --resume {run}" in err
    with RunDirLock(run):  # released on interrupt
        pass
    early = tmp_path / "early"
    assert cli_train(early, "model.name=_rel_ctrl_c", "model.overrides={}", "train.batch_size=4") == 130
    assert "interrupted before the first checkpoint" in capsys.readouterr().err


def test_the_lock_api_errors_are_run_dir_errors(tmp_path):
    # One class to catch for every run-directory problem, at the CLI and in user code.
    assert issubclass(RunLockedError, RunDirError) and issubclass(RunDirError, ValueError)
    a = RunDirLock(tmp_path / "d").acquire()
    t0 = time.perf_counter()
    with pytest.raises(RunLockedError):
        RunDirLock(tmp_path / "d").acquire()
    assert time.perf_counter() - t0 < 1.0  # refuses at once, never waits
    a.release()


def test_a_checkpoint_older_than_a_key_resumes_with_its_default(tmp_path):
    # Runs written before train.select / train.schedule existed trained as their defaults say.
    run = tmp_path / "run"
    assert cli_train(run, "train.epochs=1") == 0
    path = run / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    for key in ("select", "schedule"):
        del ckpt["config"]["train"][key]
    torch.save(ckpt, path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    del cfg["train"]["select"]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_resume(run, "train.epochs=2") == 0
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "resume"]
    assert [list(r["changed"]) for r in rows] == [["train.epochs"]]


def test_a_full_disk_while_checkpointing_names_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    from synthetic_setting import SMALL

    import polyattn.utils.io as io

    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 3:  # last.pt and best.pt of epoch 1 fit; epoch 2's last.pt does not
            # What torch.save does on a full disk: its zip writer's RuntimeError, raised while
            # handling the OSError that says what happened.
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(io.torch, "save", save)
    run = tmp_path / "run"
    argv = ["train", "--set", *SMALL, "train.select=best_val", "--out", str(run), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the disk is full" in err[0], err
    assert f"{run / 'checkpoints' / 'last.pt'} still holds the run after epoch 1" in err[0]
    assert f"polyattn train --resume {run}" in err[0]
    monkeypatch.setattr(io.torch, "save", real_save)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 1
    assert not list((run / "checkpoints").glob(".*.tmp"))  # the failed write left no partial file
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # and the run goes on
