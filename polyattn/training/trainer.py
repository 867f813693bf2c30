"""The training loop: AdamW, warmup + cosine or one-cycle, checkpoints, model selection, exact resume, DDP.

    summary = train(load_config("configs/digits_vit_micro.yaml"), "runs/digits")

A run directory holds:

    config.yaml            the resolved config (after a resume that changed keys: the config in force now)
    metrics.jsonl          one JSON object per line, "kind": "step" | "epoch" | "norms" | "resume" | "summary"
    checkpoints/last.pt    model, optimizer, scheduler, scaler, EMA weights (train.ema_decay > 0), epoch, step,
                           RNG states of every process (python, numpy, torch: mix_batch, timm's Mixup, RandAugment),
                           the best evaluation so far, config, model_args; written atomically after every epoch
    checkpoints/best.pt    with train.select=best_val: the weights of the evaluation with the best validation
                           accuracy (model, epoch, step, val, config, model_args); the test split is scored with them
    summary.json           the final summary (also returned by ``train``)
    .lock                  held by the process training there (utils.rundir.RunDirLock)

Resuming (``resume=True``) restores all of it, drops metric rows written
after the checkpoint, and continues so that the result is bitwise the run
that was never interrupted (CPU; the sampler order depends only on the seed
and the epoch, the RNG states come from the checkpoint). Config changes on
resume are taken silently (threads, device, data workers, logging), applied
(optimizer settings, schedule, step budget) or refused (model, data, batch size,
seed, amp, model selection), by each key's resume rule (``Key.resume``); applied
ones are recorded as a "resume" row with the step they took effect at.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from ..data.registry import DataBundle, build_dataset
from ..models.registry import create_model
from ..utils import atomic_save, atomic_write_json, atomic_write_text, read_jsonl, seed_everything
from ..utils.io import load_checkpoint
from ..utils.record import BackendRecorder, run_record
from ..utils.rundir import RunDirError, RunDirLock
from .checkpoint import (
    CHECKPOINT,
    config_changes,
    divergence_advice,
    read_checkpoint,
    refuse_changes,
    rng_state,
    set_rng_state,
)
from .config import ConfigError, dump_config, resolve_config, trainer_schema
from .distributed import (
    DistEnv,
    all_reduce_sum,
    broadcast_object,
    cleanup_distributed,
    gather_objects,
    init_distributed,
    on_main,
)
from .precision import amp_dtype, legacy_auto, precision_line, resolve_amp

__all__ = [
    "train",
    "load_run",
    "build_model",
    "lr_at",
    "onecycle_at",
    "BEST_CHECKPOINT",
    "RunDirError",
    "RunExistsError",
    "TrainingInterrupted",
]

BEST_CHECKPOINT = Path("checkpoints") / "best.pt"


class RunExistsError(RunDirError):
    """The output directory already holds a run and ``resume`` was not asked for."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``: says where the run stands so that the caller can print how to resume.

    ``checkpoint_epoch`` is the epoch ``checkpoints/last.pt`` holds, or None when none was written yet.
    """

    def __init__(self, run_dir: Path, checkpoint_epoch: int | None, step: int | None) -> None:
        super().__init__(str(run_dir))
        self.run_dir, self.checkpoint_epoch, self.step = run_dir, checkpoint_epoch, step

    def advice(self, resume_command: str) -> str:
        """One line for the terminal; ``resume_command`` is the command that continues this run."""
        if self.checkpoint_epoch is None:
            return (
                f"interrupted before the first checkpoint: nothing in {self.run_dir} to resume; "
                "start the run again with the same command"
            )
        return (
            f"interrupted: {self.run_dir / CHECKPOINT} keeps epoch {self.checkpoint_epoch} (step {self.step}); "
            f"continue with: {resume_command}"
        )


def _resume_changes(old: dict, new: dict) -> tuple[dict[str, list], dict[str, list]]:
    """(changes to apply and record, changes to refuse) when resuming a run of config ``old`` as ``new``.

    Each key's resume rule decides (Key.resume in training/config.py; the table in docs/training.md):
    model and data keys, train.batch_size, seed, amp and select are fixed; threads, device, data
    workers and root, and log cadence are free (taken silently); the rest applies from the resume step.
    """
    return config_changes(old, new, trainer_schema())


_OPTIMIZER_KEYS = ("lr", "weight_decay", "betas", "eps")
# Changing any of these moves the learning rate (and, for onecycle_linear, beta1) of the next update.
_SCHEDULE_KEYS = ("schedule", "min_lr", "warmup_epochs", "warmup_steps", "epochs", "max_steps")


def _with_new_defaults(cfg: dict) -> dict:
    """A checkpoint's config with the defaults of keys added since it was written.

    A new key's default is the behaviour runs had before it existed (train.select=last,
    train.schedule=cosine, data.test_fraction=0, ...), so a key the checkpoint lacks is no change.
    Checkpoints written before runs recorded their resolved precision hold train.amp=auto, which
    then meant bf16 on a GPU that supports it and fp32 everywhere else.
    """
    try:
        out = resolve_config(copy.deepcopy(cfg))
    except ConfigError:  # a key since removed or renamed: compare as written, so the diff names it
        return copy.deepcopy(cfg)
    return legacy_auto(out)


# --- model and data -------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    def norm(v):
        if isinstance(v, (list, tuple)):
            return tuple(v)
        return v

    na, nb = norm(a), norm(b)
    # img_size 32 and [32, 32] describe the same square image.
    if isinstance(na, tuple) and not isinstance(nb, tuple):
        nb = (nb, nb)
    if isinstance(nb, tuple) and not isinstance(na, tuple):
        na = (na, na)
    return na == nb


def model_kwargs(cfg: dict, bundle: DataBundle) -> dict:
    """model.overrides plus what the data dictates (image size, channels, classes); conflicts are errors."""
    kwargs = dict(cfg["model"]["overrides"])
    for key, value in bundle.model_overrides.items():
        if key in kwargs and not _same(kwargs[key], value):
            hint = " (set data.image_size to resize the data instead)" if key == "img_size" else ""
            raise ConfigError(
                f"model.overrides.{key}={kwargs[key]!r} conflicts with the data: dataset "
                f"{cfg['data']['name']!r} gives {key}={value!r}{hint}"
            )
        kwargs[key] = value
    return kwargs


def build_model(name: str, activation: str, kwargs: dict) -> nn.Module:
    """create_model with errors worded in config terms."""
    try:
        return create_model(name, activation=activation, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build model {name!r} with model.overrides {kwargs}: {e}") from None


def _init_from(model: nn.Module, source: str, log: Callable[[str], None]) -> None:
    """Load weights from a checkpoint file or run directory; a differently shaped head is skipped."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"model.init_from: no checkpoint at {path} (give a .pt file or a run directory)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and k != "pos_embed" and v.shape != own[k].shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    log(
        f"init_from {path}: loaded {len(state)} tensors; skipped (shape differs) {skipped or 'none'}; "
        f"missing {list(missing) or 'none'}; unexpected {list(unexpected) or 'none'}"
    )


# --- optimisation ---------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms, positional embedding and class token are exempt."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup to lr, then cosine to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# torch.optim.lr_scheduler.OneCycleLR's defaults, which the Nystromformer LRA code leaves in place.
ONECYCLE_DIV_FACTOR, ONECYCLE_FINAL_DIV_FACTOR = 25.0, 1e4
ONECYCLE_BASE_MOMENTUM, ONECYCLE_MAX_MOMENTUM = 0.85, 0.95


def onecycle_at(step: int, lr: float, warmup_steps: int, total_steps: int) -> tuple[float, float]:
    """(learning rate, AdamW beta1) of update ``step`` (0-based) under one-cycle with linear annealing.

    The arithmetic of ``torch.optim.lr_scheduler.OneCycleLR(max_lr=lr, total_steps=total_steps,
    pct_start=warmup_steps / total_steps, anneal_strategy="linear")`` with its other defaults: the lr
    rises from lr / 25 to lr over the warmup and falls to lr / 25 / 1e4 at the last update, while
    beta1 (cycle_momentum) falls from 0.95 to 0.85 and rises back. Two cases where OneCycleLR would
    divide by zero or extrapolate are pinned: a phase of one step takes its end value, and steps past
    the last update keep the last update's values.
    """
    initial = lr / ONECYCLE_DIV_FACTOR
    final = initial / ONECYCLE_FINAL_DIV_FACTOR
    step = min(step, total_steps - 1)
    pct_start = warmup_steps / total_steps
    phases = (
        (float(pct_start * total_steps) - 1, initial, lr, ONECYCLE_MAX_MOMENTUM, ONECYCLE_BASE_MOMENTUM),
        (total_steps - 1, lr, final, ONECYCLE_BASE_MOMENTUM, ONECYCLE_MAX_MOMENTUM),
    )
    start = 0.0
    for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            pct = (step - start) / (end - start) if end > start else 1.0
            return (lr1 - lr0) * pct + lr0, (m1 - m0) * pct + m0
        start = end
    raise AssertionError("unreachable: the last phase always matches")


def make_scheduler(
    optimizer, lr: float, min_lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine"
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``lr_at`` (schedule ``cosine``) or ``onecycle_at`` (``onecycle_linear``; beta1 is
    the caller's to set, see ``onecycle_at``)."""

    # A closure, not an object: LambdaLR checkpoints an object's attributes and
    # would restore the old total on a resume that extends train.epochs.
    def factor(step: int) -> float:
        if schedule == "onecycle_linear":
            return onecycle_at(step, lr, warmup_steps, total_steps)[0] / lr
        return lr_at(step, lr, min_lr, warmup_steps, total_steps) / lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- mixup / cutmix ---------------------------------------------------------------
def mix_batch(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float, cutmix: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (alpha ``mixup``) or CutMix (alpha ``cutmix``; half the batches when both are on).

    Returns the mixed images and soft targets (B, num_classes).
    """
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(()) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device="cpu").to(x.device)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1.0 - lam) * x[perm]
    one_hot = F.one_hot(y, num_classes).float()
    return x, lam * one_hot + (1.0 - lam) * one_hot[perm]


def timm_mixup(mixup: float, cutmix: float, label_smoothing: float, num_classes: int):
    """``timm.data.Mixup`` (per-batch mode, switch probability 0.5 as in mix_batch); its soft targets
    carry the label smoothing, so the loss must not smooth again. Draws from numpy's global RNG.
    None when timm is not installed."""
    try:
        from timm.data import Mixup
    except ImportError:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)


def apply_mixup(mixer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mixer(x, y)``; timm's Mixup wants an even batch, so an odd one (a short last batch, a
    rank's share) is padded with a copy of its last example, which is dropped again afterwards."""
    n = x.shape[0]
    if n % 2 == 0:
        return mixer(x, y)
    xm, t = mixer(torch.cat([x, x[-1:]]), torch.cat([y, y[-1:]]))
    return xm[:n], t[:n]


class PlainEma:
    """Fallback for ``timm.utils.ModelEmaV3`` without timm, for float32 weights the same update:
    ``ema = ema.lerp(weight, 1 - decay)`` for floating tensors of the state dict, a copy for the rest."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if e.is_floating_point():
                e.lerp_(m.to(e.dtype), 1.0 - self.decay)
            else:
                e.copy_(m)


# --- loaders ---------------------------------------------------------------------
def _seed_numpy_in_worker(worker_id: int) -> None:
    # torch seeds python's random and its own RNG in each DataLoader worker, not numpy's (which
    # timm's RandAugment draws from): without this, workers would share one numpy stream.
    np.random.seed(torch.initial_seed() % 2**32)


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ...: every example evaluated exactly once across processes."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(ds: Dataset, batch: int, seed: int, env: DistEnv, workers: int) -> DataLoader:
    # DistributedSampler also for one process: its order depends only on
    # (seed, epoch), which makes resume exact, and N processes see exactly the
    # batches one process would (interleaved), which makes DDP match it.
    sampler = DistributedSampler(ds, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=_seed_numpy_in_worker if workers > 0 else None,
    )


def eval_loader(ds: Dataset, batch: int, env: DistEnv, workers: int) -> DataLoader:
    sampler = ShardSampler(len(ds), env.rank, env.world_size)
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=env.device.type == "cuda")


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, dict):
        return {k: v.to(device, non_blocking=True) for k, v in x.items()}
    return x.to(device, non_blocking=True)


def _forward(model: nn.Module, x: Any) -> torch.Tensor:
    return model(**x) if isinstance(x, dict) else model(x)


def _batch_size(y: torch.Tensor) -> int:
    """Scored targets in a batch: one per example for class labels, the answers (label != -100) for tokens."""
    return int((y != -100).sum())


def _flat(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level logits (B, T, C) and targets (B, T) as (B*T, C) and (B*T,); cross_entropy skips -100."""
    if logits.dim() == 3 and y.dim() == 2:
        return logits.flatten(0, 1), y.flatten()
    return logits, y


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: DistEnv, dtype: torch.dtype | None) -> dict:
    """Mean cross-entropy and accuracy over the whole split (summed across processes)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)
    for x, y in loader:
        x, y = _to_device(x, env.device), y.to(env.device, non_blocking=True)
        with torch.autocast(env.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = _forward(model, x)
        logits, y = _flat(logits.float(), y)
        sums += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum").double(),
                (logits.argmax(-1) == y).sum().double(),
                torch.tensor(float(_batch_size(y)), dtype=torch.float64, device=env.device),
            ]
        )
    all_reduce_sum(sums, env)
    model.train(was_training)
    loss, correct, n = sums.tolist()
    return {"loss": loss / max(n, 1), "acc": correct / max(n, 1), "n": int(n)}


# --- run directory -------------------------------------------------------------
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


def _open_run_dir(cfg: dict, out_dir, resume: bool, env: DistEnv) -> tuple[Path, RunDirLock | None]:
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


# --- the loop ----------------------------------------------------------------------
# Write failures that are the machine's, not the run's: a clear error naming what survives, no traceback.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _divergence_message(what: str, step: int, epoch: int, cfg: dict, last_good: int | None, run_dir: Path) -> str:
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


def train(
    cfg: dict,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callable[[dict], None]] = (),
) -> dict:
    """Train the configured model; returns the summary also written to ``summary.json``.

    ``cfg``: a config dict (partial dicts get defaults; see ``load_config``).
    ``out_dir``: the run directory (default ``runs/<model>_<data>_<activation>_<time>``).
    ``resume``: continue the run in ``out_dir`` from ``checkpoints/last.pt``.
    ``callbacks``: functions called with every logged "step" and "epoch" row (on every process).
    Under torchrun, every process calls this; only rank 0 writes files.
    """
    cfg = resolve_config(cfg)
    env = init_distributed(cfg["train"]["device"])
    # The run records the precision it computes in (auto resolved for this device), so that its
    # config.yaml says what ran and a resume on the same machine compares like with like.
    requested = cfg["train"]["amp"]
    cfg["train"]["amp"] = resolve_amp(requested, env.device)
    threads = torch.get_num_threads()
    try:
        return _Run(cfg, env, out_dir, resume, progress, callbacks, requested).run()
    finally:
        torch.set_num_threads(threads)  # train.num_threads applies to this run only
        cleanup_distributed(env)


class _Run:
    """One training run; split into steps so that ``run`` reads top to bottom."""

    def __init__(self, cfg, env: DistEnv, out_dir, resume: bool, progress: bool, callbacks, amp_setting: str) -> None:
        self.cfg, self.env, self.callbacks = cfg, env, list(callbacks)
        self.amp_setting = amp_setting
        self.tc = cfg["train"]
        self.progress = progress and env.is_main
        if self.tc["num_threads"]:
            torch.set_num_threads(self.tc["num_threads"])
        self.run_dir, self.lock = _open_run_dir(cfg, out_dir, resume, env)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", env.is_main)
        self.resume = resume
        self.resume_rows: list[dict] = []

    def log(self, text: str) -> None:
        if self.env.is_main:
            tqdm.write(text, file=sys.stderr)

    # -- setup --
    def setup(self) -> None:
        cfg, tc, env = self.cfg, self.tc, self.env
        if tc["schedule"] == "onecycle_linear" and tc["min_lr"] > 0:
            raise ConfigError(
                f"train.min_lr={tc['min_lr']:g} applies to train.schedule=cosine only; onecycle_linear ends at "
                "train.lr / 25 / 1e4 as torch's OneCycleLR does: set train.min_lr=0"
            )
        if tc["batch_size"] % env.world_size:
            raise ConfigError(
                f"train.batch_size ({tc['batch_size']}) is the global batch and must be divisible by the "
                f"number of processes ({env.world_size})"
            )
        seed_everything(tc["seed"])  # the same initial weights on every process
        self.bundle = build_dataset(cfg["data"], tc["seed"])
        kwargs = model_kwargs(cfg, self.bundle)
        self.model_args = {
            "name": cfg["model"]["name"],
            "activation": cfg["model"]["activation"],
            "kwargs": kwargs,
        }
        model = build_model(cfg["model"]["name"], cfg["model"]["activation"], kwargs)
        if cfg["model"]["init_from"] and not self.resume:
            _init_from(model, cfg["model"]["init_from"], self.log)
        self.model = model.to(env.device)
        self.net = self.model
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, tc["weight_decay"]), lr=tc["lr"], betas=tuple(tc["betas"]), eps=tc["eps"]
        )
        workers = cfg["data"]["num_workers"]
        per_rank = tc["batch_size"] // env.world_size
        eval_batch = max(1, (tc["eval_batch_size"] or tc["batch_size"]) // env.world_size)
        self.train_loader = train_loader(self.bundle.train, per_rank, tc["seed"], env, workers)
        self.val_loader = eval_loader(self.bundle.val, eval_batch, env, workers)
        self.test_loader = None if self.bundle.test is None else eval_loader(self.bundle.test, eval_batch, env, workers)
        self.steps_per_epoch = len(self.train_loader)
        total = tc["epochs"] * self.steps_per_epoch
        self.total_steps = min(total, tc["max_steps"]) if tc["max_steps"] else total
        warmup = tc["warmup_steps"]
        if warmup is None:
            warmup = round(tc["warmup_epochs"] * self.steps_per_epoch)
        self.warmup_steps = min(self.total_steps, warmup)
        self.scheduler = make_scheduler(
            self.optimizer, tc["lr"], tc["min_lr"], self.warmup_steps, self.total_steps, tc["schedule"]
        )
        self.dtype = amp_dtype(tc["amp"])
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        if tc["mixup"] > 0 or tc["cutmix"] > 0:
            x0, y0 = self.bundle.train[0]
            if not (isinstance(x0, torch.Tensor) and x0.is_floating_point() and torch.as_tensor(y0).dim() == 0):
                raise ConfigError(
                    "train.mixup / train.cutmix need float image tensors with one class label each; this dataset "
                    "yields other examples (tokens, dicts or per-token labels): set them to 0"
                )
        self.mixer = None
        if (tc["mixup"] > 0 or tc["cutmix"] > 0) and tc["mixup_impl"] == "timm":
            self.mixer = timm_mixup(tc["mixup"], tc["cutmix"], tc["label_smoothing"], self.bundle.num_classes)
            if self.mixer is None:
                self.log("train.mixup_impl=timm: timm is not installed (pip install polyattn[timm]); using mix_batch")
        self.ema = self._make_ema()
        # Other processes draw their own dropout and augmentation randomness.
        if env.rank > 0:
            seed_everything(tc["seed"] + 7919 * env.rank)
        self.epoch, self.step, self.best_val, self.last_val = 0, 0, None, None
        self._set_beta1()
        # The best evaluation so far ({"epoch", "step", "val"}) and, with select=best_val, its weights (CPU).
        self.best: dict | None = None
        self.best_state: dict | None = None
        self.last_good_epoch: int | None = None

    def _make_ema(self):
        """timm's ModelEmaV3 of the model (a copy updated after every optimizer step), or None."""
        decay = self.tc["ema_decay"]
        if decay <= 0:
            return None
        if self.tc["select"] == "best_val":
            raise ConfigError("train.ema_decay > 0 with train.select=best_val is not supported; use select=last")
        try:
            from timm.utils import ModelEmaV3
        except ImportError:
            self.log("train.ema_decay: timm is not installed (pip install polyattn[timm]); using PlainEma")
            return PlainEma(self.model, decay)
        return ModelEmaV3(self.model, decay=decay)

    def restore(self) -> None:
        ckpt = read_checkpoint(self.run_dir, ("model", "optimizer", "scheduler", "epoch", "step", "rng", "config"))
        old = _with_new_defaults(ckpt["config"])
        applied, refused = _resume_changes(old, self.cfg)
        refuse_changes(self.run_dir, refused)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise RunDirError(
                f"cannot resume {self.run_dir}: its checkpoint does not fit the model this config builds "
                f"({str(e).splitlines()[0][:300]}); restore the run's config.yaml, or train into a new --out"
            ) from None
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.module.load_state_dict(ckpt["ema"])
            else:  # ema_decay switched on by this resume
                self.ema.module.load_state_dict(self.model.state_dict())
                self.log("train.ema_decay: the checkpoint has no EMA weights; the EMA starts from the resumed weights")
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.best_val, self.last_val = ckpt.get("best_val_acc"), ckpt.get("last_val")
        # Checkpoints written before the total was kept count their earlier segments as 0 s.
        self.time_before = float(ckpt.get("time_s_total") or 0.0)
        self.segments = int(ckpt.get("segments") or 1) + 1
        self.best = ckpt.get("best")
        # A run stopped after its last checkpoint resumes without a training step, so no forward would
        # show its backends again: the checkpoint's record keeps them (a later step records them anew).
        self.backends = (ckpt.get("record") or {}).get("backends")
        self.last_good_epoch = self.epoch
        if any(f"train.{k}" in applied for k in (*_OPTIMIZER_KEYS, *_SCHEDULE_KEYS)):
            self._apply_optimizer_settings()
        self._set_beta1()
        if self.tc["select"] == "best_val" and self.best is not None:
            self.best_state = self._restore_best(ckpt)
        states = ckpt["rng"]
        if len(states) == self.env.world_size:
            set_rng_state(states[self.env.rank], self.env.device)
        else:
            self.log(
                f"resuming with {self.env.world_size} processes from a checkpoint of {len(states)}: "
                "RNG streams are reseeded, so the run will not match an uninterrupted one bit for bit"
            )
            seed_everything(self.tc["seed"] + 7919 * self.env.rank + self.epoch)
        self.metrics.truncate_to(self.epoch, self.step)
        if self.env.is_main and self.metrics.path.exists():
            self.resume_rows = [r for r in read_jsonl(self.metrics.path) if r.get("kind") == "resume"]
        if applied:
            row = {"kind": "resume", "epoch": self.epoch, "step": self.step, "changed": applied}
            self.metrics.write([row])
            self.resume_rows.append(row)
            listed = "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in applied.items())
            self.log(f"resuming with changed config keys, in force from step {self.step}:\n  {listed}")
        self.log(f"resumed {self.run_dir} at epoch {self.epoch}, step {self.step}")

    def _apply_optimizer_settings(self) -> None:
        """Put the config's lr, weight decay, betas and eps into the restored optimizer and schedule.

        The optimizer's state dict carries the old values; the schedule continues at the current step
        as if the new lr had been the base all along.
        """
        tc = self.tc
        groups = self.optimizer.param_groups
        for i, g in enumerate(groups):
            g["weight_decay"] = tc["weight_decay"] if i == 0 else 0.0  # group 1 is exempt from decay
            g["betas"], g["eps"], g["initial_lr"] = tuple(tc["betas"]), tc["eps"], tc["lr"]
        self.scheduler.base_lrs = [tc["lr"]] * len(groups)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for g in groups:
            g["lr"] = tc["lr"] * factor
        self.scheduler._last_lr = [g["lr"] for g in groups]

    def _set_beta1(self) -> None:
        """Under onecycle_linear, AdamW's beta1 of the next update, as OneCycleLR's cycle_momentum sets it."""
        if self.tc["schedule"] != "onecycle_linear":
            return
        beta1 = onecycle_at(self.step, self.tc["lr"], self.warmup_steps, self.total_steps)[1]
        for g in self.optimizer.param_groups:
            g["betas"] = (beta1, g["betas"][1])

    def _restore_best(self, ckpt: dict) -> dict:
        """The weights of the best evaluation that last.pt records, from best.pt.

        last.pt is written before best.pt, so a run stopped between the two has a best.pt one
        evaluation behind; the missing weights are then last.pt's own, and best.pt is rewritten.
        """
        path, best = self.run_dir / BEST_CHECKPOINT, self.best
        if path.is_file():
            saved = load_checkpoint(path, ("model", "epoch", "step"), f"delete it and {CHECKPOINT} to start again")
            if (saved["epoch"], saved["step"]) == (best["epoch"], best["step"]):
                return saved["model"]
        if (best["epoch"], best["step"]) != (ckpt["epoch"], ckpt["step"]):
            raise RunDirError(
                f"cannot resume {self.run_dir}: {path} does not hold the weights of the best evaluation "
                f"(epoch {best['epoch']}, step {best['step']}) that {CHECKPOINT} records, so train.select=best_val "
                "cannot report them; restore that file, or train into a new --out"
            )
        state = {k: v.detach().to("cpu", copy=True) for k, v in ckpt["model"].items()}
        self._write_best(state)
        return state

    def _write_best(self, state: dict) -> None:
        if not self.env.is_main:
            return
        atomic_save(
            {
                "model": state,
                "epoch": self.best["epoch"],
                "step": self.best["step"],
                "val": self.best["val"],
                "config": self.cfg,
                "model_args": self.model_args,
            },
            self.run_dir / BEST_CHECKPOINT,
        )

    def save_checkpoint(self) -> None:
        states = gather_objects(rng_state(self.env.device), self.env)  # collective: every rank calls it
        if not self.env.is_main:
            return
        atomic_save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "ema": None if self.ema is None else self.ema.module.state_dict(),
                "epoch": self.epoch,
                "step": self.step,
                "rng": states,
                "sampler": {"seed": self.tc["seed"], "epoch": self.epoch},
                "best_val_acc": self.best_val,
                "best": self.best,
                "last_val": self.last_val,
                "config": self.cfg,
                "model_args": self.model_args,
                "time_s_total": self._elapsed(),
                "segments": self.segments,
                "record": self.record(),
            },
            self.run_dir / CHECKPOINT,
        )
        self.last_good_epoch, self.checkpoint_step = self.epoch, self.step

    # -- one epoch --
    def train_epoch(self, recorder) -> dict | None:
        """Run one epoch; returns the epoch's sums, or None after a divergence (self.diverged set)."""
        tc = self.tc
        self.train_loader.sampler.set_epoch(self.epoch)
        self.net.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n (all processes)
        t0 = time.perf_counter()
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {self.epoch + 1}/{tc['epochs']}",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
            leave=True,
            file=sys.stderr,
        )
        try:
            for x, y in self.train_loader:
                if self.step >= self.total_steps:
                    break
                if not self.train_step(x, y, sums, recorder, t0, bar):
                    return None
            return {"sums": sums, "time_s": time.perf_counter() - t0}
        finally:
            bar.close()

    def train_step(self, x, y, sums: torch.Tensor, recorder, t0: float, bar) -> bool:
        """One update; False (and self.diverged set) when the loss or the gradient is not finite."""
        x, y = _to_device(x, self.env.device), y.to(self.env.device, non_blocking=True)
        if recorder is not None:
            recorder.set_step(self.step)
        lr = self.optimizer.param_groups[0]["lr"]
        loss, logits, grad_norm = self._forward_backward(x, y)
        if self.backend_recorder is not None:  # the first forward has shown every attention call site
            self.backends = self.backend_recorder.chosen
            self.backend_recorder.detach()
            self.backend_recorder = None
        loss_sum, correct, count, bad_loss, bad_grad = self._batch_stats(loss, logits, grad_norm, y)
        if bad_loss or bad_grad:
            self._stop_diverged(f"loss is {loss.item()}" if bad_loss else "gradient norm is not finite")
            return False
        self._update()
        sums += torch.tensor([loss_sum, correct, count], dtype=torch.float64)
        throughput = sums[2].item() / max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(
            loss=f"{sums[0].item() / sums[2].item():.4f}",
            acc=f"{sums[1].item() / sums[2].item():.3f}",
            img_s=f"{throughput:.0f}",
            refresh=False,
        )
        rows = []
        if self.step % self.tc["log_every"] == 0:
            rows.append(
                {
                    "kind": "step",
                    "epoch": self.epoch + 1,
                    "step": self.step,
                    "loss": loss_sum / count,
                    "acc": correct / count,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "samples_per_s": throughput,
                }
            )
        if recorder is not None:
            rows += [{"kind": "norms", **r} for r in recorder.pop_rows()]
        self.metrics.write(rows)
        for row in rows:
            if row["kind"] == "step":
                for cb in self.callbacks:
                    cb(row)
        return True

    def _forward_backward(self, x, y) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, logits, gradient norm before clipping); gradients are left in the parameters."""
        tc, env = self.tc, self.env
        target, smoothing = y, tc["label_smoothing"]
        if self.mixer is not None:
            x, target = apply_mixup(self.mixer, x, y)
            smoothing = 0.0  # already in timm's soft targets
        elif tc["mixup"] > 0 or tc["cutmix"] > 0:
            x, target = mix_batch(x, y, self.bundle.num_classes, tc["mixup"], tc["cutmix"])
        with torch.autocast(env.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            logits = _forward(self.net, x)
        loss = F.cross_entropy(*_flat(logits.float(), target), label_smoothing=smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        max_norm = tc["grad_clip"] if tc["grad_clip"] > 0 else float("inf")
        return loss, logits, torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def _batch_stats(self, loss, logits, grad_norm, y) -> list[float]:
        """[loss * n, correct, n, loss not finite, gradient not finite], summed over processes."""
        n = _batch_size(y)
        stats = torch.stack(
            [
                loss.detach().double() * n,
                (logits.detach().argmax(-1) == y).sum().double(),  # -100 (unscored) never equals a class
                torch.tensor(float(n), dtype=torch.float64, device=self.env.device),
                (~torch.isfinite(loss.detach())).double(),
                # fp16's scaler skips steps with inf gradients by design; elsewhere they mean divergence.
                (~torch.isfinite(grad_norm.detach())).double()
                if self.scaler is None
                else loss.new_zeros((), dtype=torch.float64),
            ]
        )
        return all_reduce_sum(stats, self.env).tolist()

    def _stop_diverged(self, what: str) -> None:
        step, epoch = self.step + 1, self.epoch + 1
        self.diverged = {
            "step": step,
            "epoch": epoch,
            "message": _divergence_message(what, step, epoch, self.cfg, self.last_good_epoch, self.run_dir),
        }

    def _update(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.scheduler.step()
        self.step += 1
        self._set_beta1()

    def end_epoch(self, result: dict) -> None:
        tc = self.tc
        sums = result["sums"]
        self.epoch += 1
        last = self.epoch >= tc["epochs"] or self.step >= self.total_steps
        val, val_ema, improved = None, None, False
        if self.epoch % tc["eval_every"] == 0 or last:
            val = evaluate(self.model, self.val_loader, self.env, self.dtype)
            if self.ema is not None:
                val_ema = evaluate(self.ema.module, self.val_loader, self.env, self.dtype)
                val = {**val, "ema": val_ema}
            self.last_val = val
            # Strictly better: of equal accuracies the earliest is kept, as the Nystromformer LRA code does.
            if self.best_val is None or val["acc"] > self.best_val:
                self.best_val = val["acc"]
                self.best = {"epoch": self.epoch, "step": self.step, "val": val}
                improved = True
        n = max(sums[2].item(), 1.0)
        row = {
            "kind": "epoch",
            "epoch": self.epoch,
            "step": self.step,
            "train_loss": sums[0].item() / n,
            "train_acc": sums[1].item() / n,
            "val_loss": None if val is None else val["loss"],
            "val_acc": None if val is None else val["acc"],
            **(
                {}
                if self.ema is None
                else {
                    "val_loss_ema": None if val_ema is None else val_ema["loss"],
                    "val_acc_ema": None if val_ema is None else val_ema["acc"],
                }
            ),
            "lr": self.optimizer.param_groups[0]["lr"],
            "time_s": result["time_s"],
            "samples_per_s": sums[2].item() / max(result["time_s"], 1e-9),
        }
        if self.progress:
            val_text = "" if val is None else f"  val_loss {val['loss']:.4f}  val_acc {val['acc']:.4f}"
            if val_ema is not None:
                val_text += f"  val_acc_ema {val_ema['acc']:.4f}"
            self.log(
                f"epoch {self.epoch}/{tc['epochs']}  train_loss {row['train_loss']:.4f}  "
                f"train_acc {row['train_acc']:.4f}{val_text}  ({row['samples_per_s']:.0f} img/s)"
            )
        self.metrics.write([row])
        self.save_checkpoint()
        if improved and tc["select"] == "best_val":
            # After last.pt, so that a stop in between leaves a state _restore_best can complete.
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self._write_best(self.best_state)
        for cb in self.callbacks:
            cb(row)

    def _selected(self) -> dict | None:
        """{"epoch", "val"} of the weights the run reports: the best evaluation, or the final weights."""
        if self.tc["select"] == "best_val":
            return self.best
        if self.epoch == 0:
            return None
        return {"epoch": self.epoch, "val": self.last_val}

    def _evaluate_state(self, state: dict, loader: DataLoader) -> dict:
        final = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(state)
        try:
            return evaluate(self.model, loader, self.env, self.dtype)
        finally:
            self.model.load_state_dict(final)

    def _elapsed(self) -> float:
        """Seconds this run has taken, summed over the segments of a resumed run."""
        return self.time_before + time.perf_counter() - self.t_start

    def record(self) -> dict:
        """The run record (see polyattn.utils.record), taken inside the run: train.num_threads is in force."""
        return run_record(
            device=self.env.device,
            precision=self.tc["amp"],
            backends=self.backends,
            world_size=self.env.world_size,
            segments=self.segments,
            segment_time_s=time.perf_counter() - self.t_start,
        )

    def summary(self) -> dict:
        selected = self._selected()
        test = test_last = None
        if self.test_loader is not None and self.diverged is None:
            test = test_last = evaluate(self.model, self.test_loader, self.env, self.dtype)
            if self.tc["select"] == "best_val" and selected is not None and selected["epoch"] != self.epoch:
                test = self._evaluate_state(self.best_state, self.test_loader)
        ema_keys = {}
        if self.ema is not None:
            # The EMA weights are the run's result: test_acc is theirs, test_acc_raw the raw final weights'.
            test_ema = None
            if self.test_loader is not None and self.diverged is None:
                test_ema = evaluate(self.ema.module, self.test_loader, self.env, self.dtype)
            last_ema = None if self.last_val is None else self.last_val.get("ema")
            ema_keys = {
                "test_acc_raw": None if test is None else test["acc"],
                "final_val_acc_ema": None if last_ema is None else last_ema["acc"],
                "final_val_loss_ema": None if last_ema is None else last_ema["loss"],
                "ema_decay": self.tc["ema_decay"],
            }
            test = test_ema
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "run_dir": str(self.run_dir),
            "model": self.cfg["model"]["name"],
            "activation": self.cfg["model"]["activation"],
            "dataset": self.cfg["data"]["name"],
            "best_val_acc": self.best_val,
            "final_val_acc": None if self.last_val is None else self.last_val["acc"],
            "final_val_loss": None if self.last_val is None else self.last_val["loss"],
            "test_acc": None if test is None else test["acc"],
            "test_acc_last": None if test_last is None else test_last["acc"],
            **ema_keys,
            "select": self.tc["select"],
            "selected_epoch": None if selected is None else selected["epoch"],
            "selected_val_acc": None if selected is None or selected["val"] is None else selected["val"]["acc"],
            "epochs": self.epoch,
            "steps": self.step,
            "diverged": self.diverged is not None,
            "diverged_step": None if self.diverged is None else self.diverged["step"],
            "diverged_message": None if self.diverged is None else self.diverged["message"],
            "num_params": n_params,
            "world_size": self.env.world_size,
            "device": str(self.env.device),
            "amp": None if self.dtype is None else str(self.dtype).replace("torch.", ""),
            "time_s": self._elapsed(),  # all segments of a resumed run
            # What --resume --set changed, with the step each change took effect (config.yaml is the final config).
            "config_changes": [{k: r[k] for k in ("epoch", "step", "changed")} for r in self.resume_rows],
            "data": self.bundle.info,
            "record": self.record(),
        }

    def run(self) -> dict:
        try:
            summary = self._run()
        except KeyboardInterrupt:
            self._release(discard=False)
            raise TrainingInterrupted(self.run_dir, self.last_good_epoch, self.checkpoint_step) from None
        except OSError as e:
            self._release(discard=True)
            if e.errno in _WRITE_ERRNOS:
                raise RunDirError(self._write_failed(e)) from None
            raise
        except BaseException:
            # A bad input found in setup leaves no empty directory behind; a run that wrote files keeps them.
            self._release(discard=True)
            raise
        self._release(discard=False)
        return summary

    def _write_failed(self, e: OSError) -> str:
        """One line for a write the disk refused: what happened, what survives, how to go on."""
        why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}.get(e.errno, e.strerror)
        where = e.filename or self.run_dir
        if self.last_good_epoch:
            kept = (
                f"{self.run_dir / CHECKPOINT} still holds the run after epoch {self.last_good_epoch} (checkpoints "
                "are written to a temporary file and renamed, so a failed write leaves the last one whole); "
                f"free space, then continue with: polyattn train --resume {self.run_dir}"
            )
        else:
            kept = "no checkpoint was written yet; free space and start the run again"
        return f"cannot write {where}: {why}. {kept}"

    def _release(self, discard: bool) -> None:
        if self.lock is not None:
            self.lock.discard() if discard else self.lock.release()

    def _run(self) -> dict:
        self.t_start, self.time_before, self.segments = time.perf_counter(), 0.0, 1
        self.backends: dict[str, str] | None = None
        self.backend_recorder: BackendRecorder | None = None
        self.diverged: dict | None = None
        self.last_good_epoch: int | None = None
        self.checkpoint_step: int | None = None
        self.setup()
        if self.resume:
            self.restore()
            self.checkpoint_step = self.step
        elif self.env.is_main:
            self.metrics.truncate_to(0, 0)
            (self.run_dir / BEST_CHECKPOINT).unlink(missing_ok=True)  # a previous run's, never this one's
        if self.env.is_main:
            atomic_write_text(dump_config(self.cfg), self.run_dir / "config.yaml")
        if self.progress:  # narration, not a warning: quiet runs (and parallel grid workers) skip it
            self.log(
                f"run directory: {self.run_dir}  ({self.bundle.info.get('train', '?')} training examples, "
                f"{sum(p.numel() for p in self.model.parameters()):,} parameters, "
                f"{self.env.world_size} process(es) on {self.env.device})"
            )
            self.log(precision_line(self.amp_setting, self.tc["amp"], self.env.device))
        recorder = self._norm_recorder()
        self.backend_recorder = BackendRecorder(self.model)
        try:
            while self.epoch < self.tc["epochs"] and self.step < self.total_steps:
                result = self.train_epoch(recorder)
                if result is None:
                    break
                self.end_epoch(result)
        finally:
            if recorder is not None:
                recorder.detach()
            if self.backend_recorder is not None:
                self.backend_recorder.detach()
        if self.diverged is not None:
            self.log(self.diverged["message"])
        summary = self.summary()
        if self.env.is_main:
            # The record (command line, threads, segments) is summary.json's: metrics.jsonl stays the same
            # for a resumed run and an uninterrupted one.
            kept = {k: v for k, v in summary.items() if k not in ("data", "record")}
            self.metrics.write([{"kind": "summary", **kept}])
            atomic_write_json(summary, self.run_dir / "summary.json")
        return summary

    def _norm_recorder(self):
        every = self.cfg["diagnostics"]["every"]
        if every <= 0 or not self.env.is_main:
            return None
        try:
            from ..core.diagnostics import NormRecorder  # lazy: optional at import time of the trainer
        except ImportError as e:
            raise ConfigError(f"diagnostics.every={every} needs polyattn.core.diagnostics.NormRecorder ({e})") from None
        recorder = NormRecorder(self.model, every=every)
        recorder.attach()
        return recorder


# --- loading a finished run --------------------------------------------------------
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
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    args = ckpt["model_args"]
    model = build_model(args["name"], args["activation"], args["kwargs"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt["config"]
