"""How long a grid of runs will take on this machine: a measured training step, then the first epochs.

A grid (compare, sweep, recall, ``train --all-points``) announces its duration before it trains:
:func:`probe_run` times a few training steps of one run's real model, data batch, precision and
thread count (about a second), and :func:`grid_seconds` turns the per-run estimates into the time
of the whole grid on ``jobs`` workers. Once real epochs have finished, :class:`GridClock` replaces
the probe with their measured time, which also holds evaluation and norm recording.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.registry import build_dataset
from ..utils import seed_everything
from ..utils.threads import torch_threads
from .precision import amp_dtype, run_device

__all__ = ["GridClock", "RunEstimate", "fmt_duration", "grid_seconds", "probe_run"]

# A forward costs about a third of a training step (forward + backward + update).
_FORWARD_SHARE = 1 / 3


@dataclass(frozen=True)
class RunEstimate:
    """One run's measured step and the work its config asks for."""

    step_s: float  # one training step (forward, backward, clipping, AdamW), fastest of the timed ones
    record_s: float  # what one norm recording adds to a step (0 without diagnostics)
    steps: int  # training steps of the whole run
    recordings: int  # norm recordings of the whole run
    eval_examples: int  # examples evaluated over the run (validation each evaluated epoch, test at the end)
    batch_size: int

    @property
    def seconds(self) -> float:
        evaluation = self.eval_examples / self.batch_size * self.step_s * _FORWARD_SHARE
        return self.steps * self.step_s + self.recordings * self.record_s + evaluation


def _first_batch(ds, n: int) -> tuple[object, torch.Tensor]:
    from torch.utils.data import DataLoader

    return next(iter(DataLoader(ds, batch_size=n, shuffle=False)))


def probe_run(cfg: dict, steps: int = 2) -> RunEstimate:
    """Time ``steps`` training steps (after one warm-up) of the run ``cfg`` describes, on the CPU or GPU
    it would use, at its precision (``train.amp`` already resolved) and thread count; nothing is written."""
    from ..core.diagnostics import NormRecorder
    from .loaders import flatten_tokens, model_forward
    from .model_build import build_model, model_kwargs
    from .schedule import param_groups

    tc, every = cfg["train"], cfg["diagnostics"]["every"]
    device = run_device(tc["device"])
    rng = torch.get_rng_state()
    try:
        with torch_threads(tc["num_threads"]):
            seed_everything(tc["seed"])
            bundle = build_dataset(cfg["data"], tc["seed"])
            model = build_model(cfg["model"]["name"], cfg["model"]["activation"], model_kwargs(cfg, bundle)).to(device)
            opt = torch.optim.AdamW(param_groups(model, tc["weight_decay"]), lr=tc["lr"])
            x, y = _first_batch(bundle.train, tc["batch_size"])
            x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
            y = y.to(device)
            dtype = amp_dtype(tc["amp"])

            def step() -> float:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    logits = model_forward(model, x)
                loss = F.cross_entropy(*flatten_tokens(logits.float(), y))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - t0

            step()
            step_s = min(step() for _ in range(steps))
            record_s = 0.0
            if every > 0:
                with NormRecorder(model, every=1) as rec:
                    record_s = max(0.0, step() - step_s)
                    rec.pop_rows()
    finally:
        torch.set_rng_state(rng)
    per_epoch = -(-len(bundle.train) // tc["batch_size"])
    total = tc["epochs"] * per_epoch
    total = min(total, tc["max_steps"]) if tc["max_steps"] else total
    evaluated = -(-tc["epochs"] // tc["eval_every"])
    test = 0 if bundle.test is None else 2 * len(bundle.test)  # last and selected weights
    return RunEstimate(
        step_s=step_s,
        record_s=record_s,
        steps=total,
        recordings=0 if every <= 0 else -(-total // every),
        eval_examples=evaluated * len(bundle.val) + test,
        batch_size=tc["batch_size"],
    )


def grid_seconds(run_seconds: Sequence[float], jobs: int) -> float:
    """Wall time of runs of these lengths on ``jobs`` workers, each taking the next run in order when free."""
    free = [0.0] * max(1, jobs)
    for s in run_seconds:
        heapq.heappush(free, heapq.heappop(free) + s)
    return max(free)


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class GridClock:
    """The estimate of a running grid: the probe's until epochs are measured, then theirs.

    ``epoch(name, epoch, seconds)`` takes the wall time a run spent on one epoch (training,
    evaluation, norms, checkpoint). A run's first epoch also holds its start (a worker's imports,
    the data, the model), so the pace is read from the epochs after it: the first such epoch
    returns the refined line to print, later calls return None.
    """

    def __init__(self, runs: dict[str, tuple[int, float]], jobs: int, startup_s: float = 0.0) -> None:
        # name -> (epochs, estimated seconds of the whole run); startup_s: a worker process's start
        self.runs = runs
        self.jobs = max(1, jobs)
        self.startup_s = startup_s
        self.start = time.perf_counter()
        self.done: dict[str, int] = dict.fromkeys(runs, 0)
        self.refined = False

    def initial(self) -> float:
        return self.startup_s + grid_seconds([s for _, s in self.runs.values()], self.jobs)

    def epoch(self, name: str, epoch: int, seconds: float) -> str | None:
        if name not in self.done:
            return None
        first = self.done[name] == 0
        self.done[name] = max(self.done[name], epoch)
        if self.refined or first:
            return None
        self.refined = True
        # Every run's remaining epochs at the measured pace, scaled by its estimate relative to this run's.
        pace = seconds / (self.runs[name][1] / max(self.runs[name][0], 1))
        remaining = [
            (epochs - self.done[n]) * est / max(epochs, 1) * pace
            for n, (epochs, est) in self.runs.items()
            if epochs > self.done[n]
        ]
        elapsed = time.perf_counter() - self.start
        left = grid_seconds(remaining, self.jobs)
        return (
            f"after a measured epoch ({seconds:.1f} s): about {fmt_duration(elapsed + left)} in all, "
            f"{fmt_duration(left)} left"
        )
