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

This module holds ``train`` and the run it drives (setup, resume, epochs, steps, the summary);
the pieces it uses live by job: ``schedule`` (parameter groups, cosine and one-cycle),
``mixing`` (Mixup/CutMix, EMA), ``model_build`` (the model a config builds), ``loaders``
(samplers, batches, evaluation) and ``run_files`` (the directory, metrics.jsonl, best.pt,
summary.json, ``load_run``).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.registry import build_dataset
from ..utils import atomic_save, atomic_write_text, read_jsonl, seed_everything
from ..utils.record import BackendRecorder, run_record
from ..utils.rundir import RunDirError
from .checkpoint import (
    CHECKPOINT,
    config_changes,
    gather_rng_states,
    read_checkpoint,
    refuse_changes,
    set_rng_state,
)
from .config import ConfigError, dump_config, resolve_config, trainer_schema
from .distributed import RANK_SEED_STRIDE, DistEnv, all_reduce_sum, distributed_run, seed_rank, wrap_ddp
from .loaders import eval_loader, evaluate, flatten_tokens, model_forward, scored_count, to_device, train_loader
from .mixing import apply_mixup, make_ema, make_mixer, mix_batch, mixed_batch, timm_mixup
from .model_build import build_model, init_from, model_kwargs
from .precision import amp_dtype, legacy_auto, precision_line, resolve_amp
from .run_files import (
    BEST_CHECKPOINT,
    WRITE_ERRNOS,
    MetricsLog,
    RunExistsError,
    divergence_message,
    load_run,
    open_run_dir,
    restore_best,
    write_best,
    write_failed_message,
    write_summary,
)
from .schedule import apply_optimizer_settings, lr_at, make_scheduler, onecycle_at, param_groups, set_beta1

# What the trainer's users import from here; the pieces live in the modules named above.
__all__ = [
    "train",
    "load_run",
    "build_model",
    "model_kwargs",
    "lr_at",
    "onecycle_at",
    "mix_batch",
    "timm_mixup",
    "apply_mixup",
    "BEST_CHECKPOINT",
    "CHECKPOINT",
    "RunDirError",
    "RunExistsError",
    "TrainingInterrupted",
]


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


# --- the loop ----------------------------------------------------------------------
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
    # train.num_threads applies to this run only: the previous setting is back when it returns.
    with distributed_run(cfg["train"]["device"], cfg["train"]["num_threads"]) as env:
        # The run records the precision it computes in (auto resolved for this device), so that its
        # config.yaml says what ran and a resume on the same machine compares like with like.
        requested = cfg["train"]["amp"]
        cfg["train"]["amp"] = resolve_amp(requested, env.device)
        return _Run(cfg, env, out_dir, resume, progress, callbacks, requested).run()


class _Run:
    """One training run; split into steps so that ``run`` reads top to bottom."""

    def __init__(self, cfg, env: DistEnv, out_dir, resume: bool, progress: bool, callbacks, amp_setting: str) -> None:
        self.cfg, self.env, self.callbacks = cfg, env, list(callbacks)
        self.amp_setting = amp_setting
        self.tc = cfg["train"]
        self.progress = progress and env.is_main
        self.run_dir, self.lock = open_run_dir(cfg, out_dir, resume, env)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", env.is_main)
        self.resume = resume
        self.resume_rows: list[dict] = []

    def log(self, text: str) -> None:
        if self.env.is_main:
            tqdm.write(text, file=sys.stderr)

    # -- the run, top level --
    def run(self) -> dict:
        try:
            summary = self._run()
        except KeyboardInterrupt:
            self._release(discard=False)
            raise TrainingInterrupted(self.run_dir, self.last_good_epoch, self.checkpoint_step) from None
        except OSError as e:
            self._release(discard=True)
            if e.errno in WRITE_ERRNOS:
                raise RunDirError(write_failed_message(e, self.run_dir, self.last_good_epoch)) from None
            raise
        except BaseException:
            # A bad input found in setup leaves no empty directory behind; a run that wrote files keeps them.
            self._release(discard=True)
            raise
        self._release(discard=False)
        return summary

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
            write_summary(self.metrics, summary, self.run_dir)
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

    # -- setup --
    def setup(self) -> None:
        """Data, model, optimizer, loaders, schedule, precision, mixing and EMA, in an order that fixes
        the initial weights and every random stream (a resume and DDP depend on it)."""
        tc, env = self.tc, self.env
        self._check_setup()
        seed_everything(tc["seed"])  # the same initial weights on every process
        self.bundle = build_dataset(self.cfg["data"], tc["seed"])
        self._build_model()
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, tc["weight_decay"]), lr=tc["lr"], betas=tuple(tc["betas"]), eps=tc["eps"]
        )
        self._build_loaders()
        self._build_schedule()
        self.dtype = amp_dtype(tc["amp"])
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.mixer = make_mixer(tc, self.bundle, self.log)
        self.ema = make_ema(self.model, tc, self.log)
        seed_rank(tc["seed"], env)  # other processes draw their own dropout and augmentation randomness
        self.epoch, self.step, self.best_val, self.last_val = 0, 0, None, None
        self._set_beta1()
        # The best evaluation so far ({"epoch", "step", "val"}) and, with select=best_val, its weights (CPU).
        self.best: dict | None = None
        self.best_state: dict | None = None
        self.last_good_epoch: int | None = None

    def _check_setup(self) -> None:
        tc = self.tc
        if tc["schedule"] == "onecycle_linear" and tc["min_lr"] > 0:
            raise ConfigError(
                f"train.min_lr={tc['min_lr']:g} applies to train.schedule=cosine only; onecycle_linear ends at "
                "train.lr / 25 / 1e4 as torch's OneCycleLR does: set train.min_lr=0"
            )
        if tc["batch_size"] % self.env.world_size:
            raise ConfigError(
                f"train.batch_size ({tc['batch_size']}) is the global batch and must be divisible by the "
                f"number of processes ({self.env.world_size})"
            )

    def _build_model(self) -> None:
        """self.model (on the device, with init_from's weights on a fresh run) and self.net (DDP or the model)."""
        m = self.cfg["model"]
        kwargs = model_kwargs(self.cfg, self.bundle)
        self.model_args = {"name": m["name"], "activation": m["activation"], "kwargs": kwargs}
        model = build_model(m["name"], m["activation"], kwargs)
        if m["init_from"] and not self.resume:
            init_from(model, m["init_from"], self.log)
        self.model = model.to(self.env.device)
        self.net = wrap_ddp(self.model, self.env)

    def _build_loaders(self) -> None:
        tc, env, workers = self.tc, self.env, self.cfg["data"]["num_workers"]
        per_rank = tc["batch_size"] // env.world_size
        eval_batch = max(1, (tc["eval_batch_size"] or tc["batch_size"]) // env.world_size)
        self.train_loader = train_loader(self.bundle.train, per_rank, tc["seed"], env, workers)
        self.val_loader = eval_loader(self.bundle.val, eval_batch, env, workers)
        self.test_loader = None if self.bundle.test is None else eval_loader(self.bundle.test, eval_batch, env, workers)

    def _build_schedule(self) -> None:
        """The step budget, the warmup and the scheduler (train.max_steps caps the epochs' steps)."""
        tc = self.tc
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

    # -- resume and checkpoints --
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
            apply_optimizer_settings(self.optimizer, self.scheduler, self.tc)
        self._set_beta1()
        if self.tc["select"] == "best_val" and self.best is not None:
            self.best_state = restore_best(self.run_dir, self.best, ckpt, self._write_best)
        states = ckpt["rng"]
        if len(states) == self.env.world_size:
            set_rng_state(states[self.env.rank], self.env.device)
        else:
            self.log(
                f"resuming with {self.env.world_size} processes from a checkpoint of {len(states)}: "
                "RNG streams are reseeded, so the run will not match an uninterrupted one bit for bit"
            )
            seed_everything(self.tc["seed"] + RANK_SEED_STRIDE * self.env.rank + self.epoch)
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

    def _set_beta1(self) -> None:
        set_beta1(self.optimizer, self.tc, self.step, self.warmup_steps, self.total_steps)

    def _write_best(self, state: dict) -> None:
        if self.env.is_main:
            write_best(self.run_dir, self.best, state, self.cfg, self.model_args)

    def save_checkpoint(self) -> None:
        states = gather_rng_states(self.env)  # collective: every rank calls it
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
        x, y = to_device(x, self.env.device), y.to(self.env.device, non_blocking=True)
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
        x, target, smoothing = mixed_batch(self.mixer, x, y, tc, self.bundle.num_classes)
        with torch.autocast(env.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            logits = model_forward(self.net, x)
        loss = F.cross_entropy(*flatten_tokens(logits.float(), target), label_smoothing=smoothing)
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
        n = scored_count(y)
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
            "message": divergence_message(what, step, epoch, self.cfg, self.last_good_epoch, self.run_dir),
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
        """Evaluate (every train.eval_every epochs and after the last), log the epoch, write the checkpoints."""
        self.epoch += 1
        last = self.epoch >= self.tc["epochs"] or self.step >= self.total_steps
        val, val_ema, improved = None, None, False
        if self.epoch % self.tc["eval_every"] == 0 or last:
            val, val_ema, improved = self._validate()
        row = self._epoch_row(result, val, val_ema)
        if self.progress:
            val_text = "" if val is None else f"  val_loss {val['loss']:.4f}  val_acc {val['acc']:.4f}"
            if val_ema is not None:
                val_text += f"  val_acc_ema {val_ema['acc']:.4f}"
            self.log(
                f"epoch {self.epoch}/{self.tc['epochs']}  train_loss {row['train_loss']:.4f}  "
                f"train_acc {row['train_acc']:.4f}{val_text}  ({row['samples_per_s']:.0f} img/s)"
            )
        self.metrics.write([row])
        self.save_checkpoint()
        if improved and self.tc["select"] == "best_val":
            # After last.pt, so that a stop in between leaves a state restore_best can complete.
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self._write_best(self.best_state)
        for cb in self.callbacks:
            cb(row)

    def _validate(self) -> tuple[dict, dict | None, bool]:
        """(validation scores, the EMA weights' or None, whether they beat the best so far); keeps the best."""
        val = evaluate(self.model, self.val_loader, self.env, self.dtype)
        val_ema = None
        if self.ema is not None:
            val_ema = evaluate(self.ema.module, self.val_loader, self.env, self.dtype)
            val = {**val, "ema": val_ema}
        self.last_val = val
        # Strictly better: of equal accuracies the earliest is kept, as the Nystromformer LRA code does.
        if self.best_val is None or val["acc"] > self.best_val:
            self.best_val = val["acc"]
            self.best = {"epoch": self.epoch, "step": self.step, "val": val}
            return val, val_ema, True
        return val, val_ema, False

    def _epoch_row(self, result: dict, val: dict | None, val_ema: dict | None) -> dict:
        """The "epoch" row of metrics.jsonl."""
        sums = result["sums"]
        n = max(sums[2].item(), 1.0)
        return {
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

    # -- the result --
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
