"""The files of a run directory: its name, the lock, metrics.jsonl, best.pt, summary.json; loading a run.

``open_run_dir`` creates and locks the directory for rank 0, ``MetricsLog`` appends the rows of
metrics.jsonl and cuts them back to a checkpoint on resume, ``write_best`` / ``restore_best``
keep checkpoints/best.pt in step with checkpoints/last.pt, and ``load_run`` rebuilds a finished
run's model. The layout itself is described in ``polyattn.training.trainer``.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn

from ..utils import atomic_save, atomic_write_json, atomic_write_text, read_jsonl
from ..utils.io import load_checkpoint
from ..utils.rundir import RunDirError, RunDirLock
from .checkpoint import CHECKPOINT, divergence_advice
from .distributed import DistEnv, broadcast_object, on_main
from .model_build import build_model

__all__ = [
    "BEST_CHECKPOINT",
    "RunExistsError",
    "default_run_dir",
    "open_run_dir",
    "MetricsLog",
    "write_summary",
    "write_best",
    "restore_best",
    "WRITE_ERRNOS",
    "write_failed_message",
    "divergence_message",
    "load_run",
]

BEST_CHECKPOINT = Path("checkpoints") / "best.pt"


class RunExistsError(RunDirError):
    """The output directory already holds a run and ``resume`` was not asked for."""


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-") or "run"


def default_run_dir(cfg: dict) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    m = cfg["model"]
    return Path("runs") / f"{_slug(m['name'])}_{_slug(cfg['data']['name'])}_{_slug(m['activation'])}_{stamp}"


class MetricsLog:
    """metrics.jsonl: append-only rows, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def truncate_to(self, epoch: int, step: int) -> None:
        """Keep the rows a run had written when its checkpoint at (epoch, step) was saved."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for row in read_jsonl(self.path):
            kind = row.get("kind")
            # "step" rows count updates done; "norms" rows carry the step index
            # of the forward they measured, i.e. the updates done before it.
            if (
                (kind == "epoch" and row.get("epoch", 0) <= epoch)
                or (kind in ("step", "resume") and row.get("step", 0) <= step)
                or (kind == "norms" and row.get("step", 0) < step)
            ):
                keep.append(row)
        atomic_write_text("".join(_json_line(r) for r in keep), self.path)

    def write(self, rows: Iterable[dict]) -> None:
        if not self.enabled:
            return
        text = "".join(_json_line(r) for r in rows)
        if text:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()


def _json_line(row: dict) -> str:
    return json.dumps(row) + "\n"


def open_run_dir(cfg: dict, out_dir, resume: bool, env: DistEnv) -> tuple[Path, RunDirLock | None]:
    """The run directory, locked by rank 0 for the whole run (the lock is None on other ranks)."""
    if out_dir is None:
        if resume:
            raise ValueError("resume=True needs the run directory to resume")
        out_dir = default_run_dir(cfg) if env.is_main else None
        out_dir = broadcast_object(out_dir, env)
    run_dir = Path(out_dir)

    def lock_dir() -> RunDirLock:
        if resume and not run_dir.is_dir():
            raise FileNotFoundError(f"cannot resume: run directory {run_dir} does not exist")
        lock = RunDirLock(run_dir, "polyattn train", command="train").acquire()
        if not resume and (run_dir / CHECKPOINT).exists():
            lock.release()
            raise RunExistsError(
                f"{run_dir} already holds a run ({CHECKPOINT}); resume it with --resume {run_dir} "
                "or choose another --out"
            )
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        return lock

    # Every rank raises rank 0's error, so that none waits in a collective for a run that never starts.
    lock = on_main(lock_dir, env)
    return run_dir, lock


def write_summary(metrics: MetricsLog, summary: dict, run_dir: Path) -> None:
    """The summary as metrics.jsonl's last row and as summary.json (rank 0 only)."""
    # The record (command line, threads, segments) is summary.json's: metrics.jsonl stays the same
    # for a resumed run and an uninterrupted one.
    kept = {k: v for k, v in summary.items() if k not in ("data", "record")}
    metrics.write([{"kind": "summary", **kept}])
    atomic_write_json(summary, run_dir / "summary.json")


def write_best(run_dir: Path, best: dict, state: dict, cfg: dict, model_args: dict) -> None:
    """checkpoints/best.pt: the weights ``state`` of the evaluation ``best`` ({"epoch", "step", "val"})."""
    atomic_save(
        {
            "model": state,
            "epoch": best["epoch"],
            "step": best["step"],
            "val": best["val"],
            "config": cfg,
            "model_args": model_args,
        },
        run_dir / BEST_CHECKPOINT,
    )


def restore_best(run_dir: Path, best: dict, ckpt: dict, rewrite: Callable[[dict], None]) -> dict:
    """The weights of the best evaluation ``best`` that last.pt (``ckpt``) records, from best.pt.

    last.pt is written before best.pt, so a run stopped between the two has a best.pt one
    evaluation behind; the missing weights are then last.pt's own, and ``rewrite`` writes them.
    """
    path = run_dir / BEST_CHECKPOINT
    if path.is_file():
        saved = load_checkpoint(path, ("model", "epoch", "step"), f"delete it and {CHECKPOINT} to start again")
        if (saved["epoch"], saved["step"]) == (best["epoch"], best["step"]):
            return saved["model"]
    if (best["epoch"], best["step"]) != (ckpt["epoch"], ckpt["step"]):
        raise RunDirError(
            f"cannot resume {run_dir}: {path} does not hold the weights of the best evaluation "
            f"(epoch {best['epoch']}, step {best['step']}) that {CHECKPOINT} records, so train.select=best_val "
            "cannot report them; restore that file, or train into a new --out"
        )
    state = {k: v.detach().to("cpu", copy=True) for k, v in ckpt["model"].items()}
    rewrite(state)
    return state


# Write failures that are the machine's, not the run's: a clear error naming what survives, no traceback.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def write_failed_message(e: OSError, run_dir: Path, last_good_epoch: int | None) -> str:
    """One line for a write the disk refused: what happened, what survives, how to go on."""
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}.get(e.errno, e.strerror)
    where = e.filename or run_dir
    if last_good_epoch:
        kept = (
            f"{run_dir / CHECKPOINT} still holds the run after epoch {last_good_epoch} (checkpoints "
            "are written to a temporary file and renamed, so a failed write leaves the last one whole); "
            f"free space, then continue with: polyattn train --resume {run_dir}"
        )
    else:
        kept = "no checkpoint was written yet; free space and start the run again"
    return f"cannot write {where}: {why}. {kept}"


def divergence_message(what: str, step: int, epoch: int, cfg: dict, last_good: int | None, run_dir: Path) -> str:
    """One line for a run stopped by a non-finite loss or gradient: where, what the directory keeps, what to try."""
    act = cfg["model"]["activation"]
    clip = cfg["train"]["grad_clip"]
    kept = (
        f"{run_dir / CHECKPOINT} keeps the weights after epoch {last_good}"
        if last_good
        else "no checkpoint was written yet (it diverged in the first epoch)"
    )
    advice = divergence_advice(act)
    clipping = f"a smaller train.grad_clip (it is {clip:g} now)" if clip > 0 else "train.grad_clip > 0 (it is off now)"
    return (
        f"diverged: {what} at step {step} (epoch {epoch}, activation {act}); stopping. {kept}. "
        f"Try {advice}a lower train.lr (it is {cfg['train']['lr']:g} now), or {clipping}."
    )


def load_run(
    run_dir: str | Path, map_location: str | torch.device = "cpu", checkpoint: str = "last"
) -> tuple[nn.Module, dict]:
    """(model in eval mode with the run's weights, the run's config) from a run directory.

    ``checkpoint``: "last" (the final weights) or "best" (checkpoints/best.pt of a train.select=best_val run).
    """
    run_dir = Path(run_dir)
    if checkpoint not in ("last", "best"):
        raise ValueError(f"checkpoint must be 'last' or 'best', got {checkpoint!r}")
    path = run_dir / (CHECKPOINT if checkpoint == "last" else BEST_CHECKPOINT)
    if not path.is_file():
        hint = " (it exists for runs with train.select=best_val)" if checkpoint == "best" else ""
        raise FileNotFoundError(f"no checkpoint at {path}{hint}: is {run_dir} a polyattn run directory?")
    ckpt = load_checkpoint(path, ("model_args", "model", "config"), map_location=map_location)
    args = ckpt["model_args"]
    model = build_model(args["name"], args["activation"], args["kwargs"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt["config"]
