"""Compare attention activations: one model per activation and seed, then a table and a report.

    from polyattn.experiments.compare import compare
    results = compare("runs/compare")   # digits at 65 tokens, vit_micro; the Table 1 set + x^p/sqrt(N); 3 seeds
    print(results["table_text"])

Every run goes through the polyattn trainer (``polyattn.training.train``) with
the norm recorder on, into ``OUT/runs/<activation-slug>-s<seed>/`` (resolved
config, metrics.jsonl, checkpoints, summary.json). ``OUT`` then holds
``results.json``, ``report.md`` and the PNG figures (see
:mod:`polyattn.experiments.report`). A run that diverges is recorded as
diverged, not raised. ``resume=True`` reuses finished runs and continues
interrupted ones from their last checkpoint, so a long comparison never loses
work.

The grid machinery here (:func:`plan_runs`, :func:`run_grid`) is shared with
the scale sweep in :mod:`polyattn.experiments.sweep`.
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from ..core.activations import get_activation
from ..training.checkpoint import config_changes
from ..training.config import REUSABLE, ConfigError, dump_config, load_config, resolve_config, trainer_schema
from ..training.estimate import GridClock, fmt_duration, probe_run
from ..training.precision import PRECISION_WORDS, legacy_auto, resolve_run_precision, silence_emulation_warning
from ..training.trainer import CHECKPOINT, train
from ..utils import RunDirLock, atomic_write_json, atomic_write_text
from ..utils.format import fmt_pct
from ..utils.machine import cpu_class, machine_info
from ..utils.record import run_facts, run_record, runs_digest
from .report import compare_markdown, format_table, write_compare_figures

__all__ = [
    "BASE_CONFIG",
    "DEFAULT_ACTIVATIONS",
    "DEFAULT_NORM_EVERY",
    "DEFAULT_SEEDS",
    "CompareError",
    "GridRun",
    "base_overrides",
    "check_jobs",
    "compare",
    "default_jobs",
    "format_table",
    "json_safe",
    "mean_std",
    "metric_words",
    "paired_difference",
    "parse_activations",
    "parse_seeds",
    "plan_runs",
    "relative_path",
    "run_grid",
    "summarize",
    "t_interval",
    "usable_cores",
]

# The paper's Table 1 set (softmax, x^3/16, x^3, x/16, x) and the theory's own scale, 1/sqrt(N).
DEFAULT_ACTIVATIONS: tuple[str, ...] = ("softmax", "x^3/sqrt(N)", "x^3/16", "x^3", "x/sqrt(N)", "x/16", "x")
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
# Recording every 5 of the 255 steps of a default run gives 51 points per curve:
# smooth curves for a cost lost in the timing noise.
DEFAULT_NORM_EVERY = 5

# The comparison's base config when no --config is given: the same settings as
# configs/digits_vit_micro.yaml (a test keeps the two equal), held here so that
# an installed polyattn does not need the repository's configs/ directory.
BASE_CONFIG: dict[str, Any] = {
    "model": {"name": "vit_micro", "activation": "softmax", "overrides": {"patch_size": 1, "pos_embed_std": 1.0}},
    "data": {"name": "digits", "val_fraction": 0.2, "test_fraction": 0.2, "seed": 0, "augment": "none"},
    "train": {
        "epochs": 15,
        "batch_size": 64,
        "lr": 3.0e-3,
        "min_lr": 1.0e-5,
        "weight_decay": 0.05,
        "warmup_epochs": 3,
        "label_smoothing": 0.1,
        "grad_clip": 1.0,
        "seed": 0,
        "log_every": 10,
        "num_threads": 1,
        "amp": "auto",
        "select": "best_val",
    },
    "diagnostics": {"every": 0},
}
BASE_CONFIG_NAME = "built-in digits + vit_micro (= configs/digits_vit_micro.yaml)"

# Keys the comparison sets per run; --set must not fight over them.
_OWNED_KEYS = {"model.activation": "--activations", "train.seed": "--seeds"}


class CompareError(ValueError):
    """A bad argument or an output directory that does not fit the request; the message says the fix."""


# --------------------------------------------------------------------------- #
# Arguments
# --------------------------------------------------------------------------- #
def parse_activations(specs: Iterable[str] | str) -> list[str]:
    """Canonical activation specs from strings (each may hold several, comma-separated).

    Raises CompareError naming the bad spec (with the accepted forms) or a duplicate.
    """
    if isinstance(specs, str):
        specs = [specs]
    items = [s.strip() for text in specs for s in str(text).split(",") if s.strip()]
    if not items:
        raise CompareError("--activations: no activation given; e.g. --activations softmax,x^3/sqrt(N)")
    out: list[str] = []
    for item in items:
        try:
            spec = get_activation(item).spec
        except ValueError as e:
            raise CompareError(f"--activations: {e}") from None
        if spec in out:
            raise CompareError(f"--activations: {item!r} is listed twice (as {spec!r}); list each activation once")
        out.append(spec)
    return out


def parse_seeds(value: int | str | Sequence[int]) -> list[int]:
    """Seeds from a count (``3`` -> 0, 1, 2), a comma list (``"0,5,7"``, ``"5,"``) or a sequence of ints."""
    if isinstance(value, str):
        text = value.replace(" ", "")
        try:
            seeds = [int(v) for v in text.split(",") if v] if "," in text else list(range(int(text)))
        except ValueError:
            raise CompareError(
                f"--seeds: expected a count such as 3 (seeds 0, 1, 2) or a comma list such as 0,5,7, got {value!r}"
            ) from None
    elif isinstance(value, int) and not isinstance(value, bool):
        seeds = list(range(value))
    else:
        seeds = [int(v) for v in value]
    if not seeds:
        raise CompareError("--seeds: at least one seed is needed (e.g. --seeds 3, or --seeds 0,)")
    bad = [s for s in seeds if s < 0]
    if bad:
        raise CompareError(f"--seeds: seeds must be >= 0, got {bad}")
    if len(set(seeds)) != len(seeds):
        raise CompareError(f"--seeds: seed listed twice in {seeds}")
    return seeds


def _flatten(d: dict, prefix: str = "") -> list[str]:
    """``{"a": {"b": 1}}`` -> ``["a.b=1"]``; values JSON-encoded (JSON is YAML, as overrides are parsed)."""
    out = []
    for key, value in d.items():
        if isinstance(value, dict) and value and key != "overrides":
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def base_overrides(
    config: str | os.PathLike | None = None,
    dataset: str | None = None,
    model: str | None = None,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    norm_every: int | None = None,
) -> tuple[str | None, list[str]]:
    """(config file or None, the ``key=value`` list) every run of a comparison starts from.

    Layers, later winning: ``config`` (or :data:`BASE_CONFIG`), ``dataset``,
    ``model``, ``epochs``, ``norm_every`` (only where the config records no
    norms), then ``overrides``. Raises CompareError for keys the comparison
    sets per run and ConfigError for bad keys or values.
    """
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key in _OWNED_KEYS:
            raise CompareError(f"--set {text}: {key} is set per run by the comparison; use {_OWNED_KEYS[key]}")
    layers = [] if config is not None else _flatten(BASE_CONFIG)
    if dataset is not None:
        layers.append(f"data.name={json.dumps(dataset)}")
    if model is not None:
        layers.append(f"model.name={json.dumps(model)}")
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise CompareError(f"--epochs must be a positive integer, got {epochs!r}")
        layers.append(f"train.epochs={epochs}")
    path = None if config is None else str(config)
    # Only where the config records no norms: a config that sets diagnostics.every keeps its own.
    if norm_every is not None and load_config(path, layers + list(overrides))["diagnostics"]["every"] == 0:
        layers.append(f"diagnostics.every={norm_every}")
    return path, layers + list(overrides)


# --------------------------------------------------------------------------- #
# Grid of runs
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class GridRun:
    """One training run of a grid: its directory name, activation, seed, extra overrides, grid point.

    ``activation``/``seed`` None leave the config's own; ``point`` picks a point of a grid config file.
    """

    name: str
    activation: str | None
    seed: int | None
    overrides: tuple[str, ...] = ()
    labels: dict = field(default_factory=dict, compare=False, hash=False)  # copied into the run's record
    point: str | None = None


@dataclass
class PlannedRun:
    run: GridRun
    cfg: dict
    run_dir: Path
    state: str  # "new": train; "resume": continue from its checkpoint; "done": reuse summary.json


def _changed(old: dict, new: dict) -> list[str]:
    # A resumed comparison reuses a run only when it differs in keys that change no number (free ones).
    _, refused = config_changes(old, new, trainer_schema(), allowed=REUSABLE)
    return [f"{key}: {a!r} (on disk) vs {b!r} (now)" for key, (a, b) in refused.items()]


def _normalised(cfg: dict) -> dict:
    return yaml.safe_load(dump_config(cfg)) or {}


def _saved_config(path: Path) -> dict:
    """A run's config.yaml with the defaults of keys added since it was written: a key it lacks ran
    with the behaviour that key's default names, so a missing key is not a change."""
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        return _normalised(legacy_auto(resolve_config(saved)))
    except ConfigError:  # a key since removed or renamed: compare as written, naming what differs
        return saved


def plan_runs(
    runs: Sequence[GridRun],
    config: str | None,
    overrides: Sequence[str],
    out_dir: str | os.PathLike,
    resume: bool,
) -> list[PlannedRun]:
    """Resolve every run's config and decide what to do with it; all errors come before any training.

    Without ``resume``, a run directory that already holds a checkpoint or a
    summary is an error. With it, a finished run is reused and an interrupted
    one continued, both only if their saved config equals the requested one.
    """
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise CompareError(f"two runs share a directory name in {names}")
    root = Path(out_dir) / "runs"
    planned, existing = [], []
    for run in runs:
        run_overrides = [
            *overrides,
            *([] if run.activation is None else [f"model.activation={json.dumps(run.activation)}"]),
            *([] if run.seed is None else [f"train.seed={run.seed}"]),
            *run.overrides,
        ]
        try:
            # auto precision resolved here, once for the grid: each run records what it computes in.
            cfg = resolve_run_precision(load_config(config, run_overrides, point=run.point))
        except ConfigError as e:
            raise ConfigError(f"run {run.name}: {e}") from None
        run_dir = root / run.name
        finished = (run_dir / "summary.json").is_file()
        started = finished or (run_dir / CHECKPOINT).is_file()
        if started and not resume:
            existing.append(run.name)
        state = "new"
        if started and resume:
            saved = run_dir / "config.yaml"
            if saved.is_file():
                diff = _changed(_saved_config(saved), _normalised(cfg))
                if diff:
                    hint = ""
                    if any(d.startswith("train.amp:") for d in diff):
                        hint = (
                            "\n(train.amp=auto resolves by what this machine computes natively; --set train.amp="
                            "<the value on disk> continues as the runs began)"
                        )
                    raise CompareError(
                        f"{run_dir} was made with another config, so --resume cannot reuse it:\n  "
                        + "\n  ".join(diff)
                        + hint
                        + f"\nrerun with the same settings, or choose another --out than {out_dir}"
                    )
            state = "done" if finished else "resume"
        planned.append(PlannedRun(run, cfg, run_dir, state))
    if existing:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise CompareError(
            f"{out_dir} already holds runs of this comparison ({shown}); pass --resume to reuse the finished "
            "ones and continue the others, or choose another --out"
        )
    return planned


def _record(planned: PlannedRun, summary: dict, status: str) -> dict:
    run = planned.run
    diverged = bool(summary.get("diverged"))
    if summary.get("test_acc") is not None:
        metric = "test_acc"
    else:
        metric = "selected_val_acc" if summary.get("select") == "best_val" else "final_val_acc"
    return {
        "name": run.name,
        "activation": planned.cfg["model"]["activation"],
        "seed": planned.cfg["train"]["seed"],
        **run.labels,
        "run_dir": str(planned.run_dir),
        "status": status,
        # A diverged run has no final model: its last validation number is not its result.
        "top1": None if diverged else summary.get(metric),
        "metric": metric,
        "select": summary.get("select", "last"),
        "selected_epoch": summary.get("selected_epoch"),
        "best_val_acc": summary.get("best_val_acc"),
        "final_val_acc": summary.get("final_val_acc"),
        "test_acc": summary.get("test_acc"),
        "diverged": diverged,
        "diverged_step": summary.get("diverged_step"),
        "diverged_message": summary.get("diverged_message"),
        "epochs": summary.get("epochs"),
        "steps": summary.get("steps"),
        "time_s": summary.get("time_s"),
        "num_params": summary.get("num_params"),
        **run_facts(summary),
    }


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_jobs(planned: Sequence[PlannedRun]) -> int:
    """How many runs train at once when the caller does not say: as many as the cores hold at the
    runs' ``train.num_threads`` (0 = one run takes them all), never more than there are runs to train."""
    todo = [p for p in planned if p.state != "done"]
    if not todo:
        return 1
    threads = max(p.cfg["train"]["num_threads"] for p in todo)
    if threads == 0 or any(p.cfg["train"]["device"] not in ("cpu", "auto") for p in todo):
        return 1
    if any(p.cfg["train"]["device"] == "auto" for p in todo):
        import torch

        if torch.cuda.is_available():
            return 1  # one GPU: runs take turns on it
    return max(1, min(len(todo), usable_cores() // threads))


def check_jobs(jobs: int | str | None) -> int | None:
    """``jobs`` as a positive int, or None for :func:`default_jobs`; CompareError for anything else."""
    if jobs is None or jobs == "auto":
        return None
    try:
        value = int(jobs)
    except (TypeError, ValueError):
        value = 0
    if isinstance(jobs, bool) or value < 1 or str(value) != str(jobs).strip():
        raise CompareError(f"--jobs must be a positive integer or auto (one run per core), got {jobs!r}")
    return value


def _result_line(rec: dict, done: int, total: int) -> str:
    result = f"diverged at step {rec['diverged_step']}" if rec["diverged"] else fmt_pct(rec["top1"])
    return f"[{done}/{total}] {rec['name']}: {result} ({rec['status']})"


def _reuse(p: PlannedRun) -> dict:
    return _record(p, json.loads((p.run_dir / "summary.json").read_text(encoding="utf-8")), "reused")


def run_grid(
    planned: Sequence[PlannedRun], progress: bool = True, desc: str = "runs", jobs: int | None = 1
) -> list[dict]:
    """Train (or reuse) every planned run; one record per run (see ``_record``), in the planned order.

    ``jobs``: how many runs train at once, each in its own process (None: :func:`default_jobs`).
    Each run's numbers do not depend on it: a run is seeded by its config alone and uses
    ``train.num_threads`` threads either way. With one job an overall bar counts runs and the
    trainer's own epoch bars run inside it; with several, one bar counts the epochs of all runs.
    """
    jobs = default_jobs(planned) if jobs is None else jobs
    clock = _announce(planned, jobs) if progress else None
    if jobs > 1 and sum(p.state != "done" for p in planned) > 1:
        return _run_parallel(planned, progress, desc, jobs, clock)
    records = []
    bar = tqdm(
        total=len(planned),
        desc=desc,
        unit="run",
        position=0,
        leave=True,
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not progress,
    )
    try:
        for p in planned:
            bar.set_postfix_str(p.run.name, refresh=True)
            if p.state == "done":
                rec = _reuse(p)
            else:
                callbacks = [] if clock is None else [_EpochTimer(p.run.name, clock.epoch, tqdm.write)]
                summary = train(p.cfg, p.run_dir, resume=p.state == "resume", progress=progress, callbacks=callbacks)
                rec = _record(p, summary, "resumed" if p.state == "resume" else "trained")
            records.append(rec)
            if progress:
                tqdm.write(_result_line(rec, len(records), len(planned)), file=sys.stderr)
            bar.update(1)
    finally:
        bar.close()
    return records


def _announce(planned: Sequence[PlannedRun], jobs: int) -> GridClock | None:
    """Print how long the grid should take here (a few timed training steps per kind of run) and
    return the clock that refines it once an epoch is measured; None when nothing is left to train."""
    todo = [p for p in planned if p.state != "done"]
    if not todo:
        return None
    import resource

    # A worker imports what this process has imported: its CPU time so far stands for a worker's start-up.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    startup = min(usage.ru_utime + usage.ru_stime, 30.0)
    probes: dict[str, Any] = {}
    runs: dict[str, tuple[int, float]] = {}
    for p in todo:
        # Runs that differ only in activation and seed share one probe (the first's activation).
        shape = {**p.cfg, "model": {**p.cfg["model"], "activation": None}, "train": {**p.cfg["train"], "seed": None}}
        key = json.dumps(shape, sort_keys=True, default=str)
        if key not in probes:
            try:
                probes[key] = probe_run(p.cfg)
            except Exception as e:  # an estimate must never stop a grid: the run itself reports real errors
                tqdm.write(f"(no duration estimate: {type(e).__name__}: {e})", file=sys.stderr)
                return None
        est = probes[key]
        runs[p.run.name] = (p.cfg["train"]["epochs"], est.seconds)
    clock = GridClock(runs, jobs, startup if jobs > 1 else 0.0)
    first = next(iter(probes.values()))
    amp = PRECISION_WORDS[todo[0].cfg["train"]["amp"]]
    tqdm.write(
        f"estimated duration on this machine ({cpu_class()}; {amp}): about {fmt_duration(clock.initial())} for "
        f"{len(todo)} run(s), {jobs} at a time (a training step measured at {1e3 * first.step_s:.0f} ms); "
        "refined once an epoch is measured",
        file=sys.stderr,
    )
    return clock


class _EpochTimer:
    """A trainer callback that passes each epoch's wall time (evaluation and checkpoint included) to ``sink``."""

    def __init__(self, name: str, sink: Any, write: Any = None) -> None:
        self.name, self.sink, self.write = name, sink, write
        self.last = time.perf_counter()

    def __call__(self, row: dict) -> None:
        if row.get("kind") != "epoch":
            return
        now = time.perf_counter()
        line = self.sink(self.name, row["epoch"], now - self.last)
        self.last = now
        if line and self.write is not None:
            self.write(line, file=sys.stderr)


_EVENTS: Any = None  # in a worker process: the queue its epochs are reported on


def _init_worker(events: Any) -> None:
    global _EVENTS
    _EVENTS = events
    silence_emulation_warning()  # the parent warned once, when it planned the runs
    # Ctrl-C reaches every process of the terminal's group; the parent alone handles it (by stopping
    # the workers), so that no worker dies mid-write on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _train_worker(cfg: dict, run_dir: str, resume: bool, name: str) -> dict:
    """One run in a worker process; every finished epoch is reported to the parent."""

    timer = _EpochTimer(name, lambda n, epoch, seconds: _EVENTS.put((n, epoch, seconds)))
    return train(cfg, run_dir, resume=resume, progress=False, callbacks=[timer])


def _run_parallel(
    planned: Sequence[PlannedRun], progress: bool, desc: str, jobs: int, clock: GridClock | None = None
) -> list[dict]:
    """run_grid with ``jobs`` worker processes. A Ctrl-C stops the workers at once: every run keeps its
    last epoch's checkpoint (written atomically), which ``--resume`` continues, and finished runs their
    summary."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    total = len(planned)
    records: dict[int, dict] = {i: _reuse(p) for i, p in enumerate(planned) if p.state == "done"}
    todo = [i for i, p in enumerate(planned) if p.state != "done"]
    # Spawned workers import torch afresh: a forked child of a process whose OpenMP pool ran can hang.
    ctx = mp.get_context("spawn")
    events = ctx.Queue()  # handed to the workers when they start: a queue cannot travel with a task
    epochs_total = {planned[i].run.name: planned[i].cfg["train"]["epochs"] for i in todo}
    epochs_done = dict.fromkeys(epochs_total, 0)
    bar = tqdm(
        total=sum(epochs_total.values()),
        desc=f"{desc} ({jobs} at a time)",
        unit="epoch",
        leave=True,
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not progress,
    )
    if progress:
        for n, i in enumerate(sorted(records), 1):
            tqdm.write(_result_line(records[i], n, total), file=sys.stderr)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(events,))
    try:
        futures = {
            pool.submit(
                _train_worker,
                planned[i].cfg,
                str(planned[i].run_dir),
                planned[i].state == "resume",
                planned[i].run.name,
            ): i
            for i in todo
        }
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(events, epochs_done, bar, clock)
            for fut in sorted(finished, key=futures.__getitem__):
                i = futures[fut]
                p = planned[i]
                rec = _record(p, fut.result(), "resumed" if p.state == "resume" else "trained")
                records[i] = rec
                # A run that stops early (divergence, max_steps) leaves its remaining epochs uncounted.
                bar.update(epochs_total[p.run.name] - epochs_done[p.run.name])
                epochs_done[p.run.name] = epochs_total[p.run.name]
                if progress:
                    tqdm.write(_result_line(rec, len(records), total), file=sys.stderr)
            running = [n for n, e in epochs_done.items() if 0 < e < epochs_total[n]]
            bar.set_postfix_str(", ".join(running), refresh=False)
    except BaseException:
        # Ctrl-C or a failed run: stop every worker now rather than wait for the runs in flight.
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    events.close()
    return [records[i] for i in range(total)]


def _drain(events: Any, epochs_done: dict[str, int], bar: Any, clock: GridClock | None = None) -> None:
    """Move the epoch counts the workers reported onto the bar (and their times onto the clock)."""
    while True:
        try:
            name, epoch, seconds = events.get_nowait()
        except queue.Empty:
            return
        if name in epochs_done and epoch > epochs_done[name]:
            bar.update(epoch - epochs_done[name])
            epochs_done[name] = epoch
        line = None if clock is None else clock.epoch(name, epoch, seconds)
        if line:
            tqdm.write(line, file=sys.stderr)


# --------------------------------------------------------------------------- #
# Aggregation
# --------------------------------------------------------------------------- #
def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for fewer than 2 values)."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def t_interval(values: Sequence[float], level: float = 0.95) -> list[float] | None:
    """Student-t confidence interval of the mean, [lo, hi] (None for fewer than 2 values)."""
    if len(values) < 2:
        return None
    from scipy import stats

    mean, std = mean_std(values)
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return [mean - half, mean + half]


def paired_difference(a: dict[str, float | None], b: dict[str, float | None]) -> dict | None:
    """a - b over the seeds both finished: mean, 95% t-interval and the paired t-test's two-sided p.

    Seeds pair runs that share their initial weights' seed and data order, which removes the seed's
    own effect from the comparison. None with fewer than 2 pairs.
    """
    pairs = [(a[s], b[s]) for s in a if s in b and a[s] is not None and b[s] is not None]
    if len(pairs) < 2:
        return None
    diffs = [x - y for x, y in pairs]
    mean, std = mean_std(diffs)
    if std == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        from scipy import stats

        p = float(stats.ttest_rel([x for x, _ in pairs], [y for _, y in pairs]).pvalue)
    return {"mean": mean, "ci95": t_interval(diffs), "p": p, "pairs": len(pairs)}


def summarize(records: Sequence[dict], activations: Sequence[str], baseline: str = "softmax") -> list[dict]:
    """One row per activation: top-1 mean, std and 95% interval over its finished (not diverged) seeds,
    and the paired difference to ``baseline`` (when it is in the grid) over the seeds both finished."""
    rows = []
    for act in activations:
        recs = [r for r in records if r["activation"] == act]
        ok = [r["top1"] for r in recs if not r["diverged"] and r["top1"] is not None]
        mean, std = mean_std(ok)
        rows.append(
            {
                "activation": act,
                "mean": mean,
                "std": std,
                "ci95": t_interval(ok),
                "n": len(ok),
                "seeds": len(recs),
                "diverged": sum(r["diverged"] for r in recs),
                "per_seed": {str(r["seed"]): r["top1"] for r in recs},
                "best_val_mean": mean_std([r["best_val_acc"] for r in recs if r["best_val_acc"] is not None])[0],
            }
        )
    base = next((r for r in rows if r["activation"] == baseline), None)
    for r in rows:
        vs = None if base is None or r is base else paired_difference(r["per_seed"], base["per_seed"])
        r["vs_baseline"] = None if vs is None else {"baseline": baseline, **vs}
    return rows


def relative_path(path: str | os.PathLike, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (results stay valid when the directory moves)."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- #
# The comparison
# --------------------------------------------------------------------------- #
def compare(
    out_dir: str | os.PathLike = "runs/compare",
    activations: Iterable[str] | str = DEFAULT_ACTIVATIONS,
    seeds: int | str | Sequence[int] = DEFAULT_SEEDS,
    dataset: str | None = None,
    model: str | None = None,
    epochs: int | None = None,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    progress: bool = True,
    norm_every: int = DEFAULT_NORM_EVERY,
    figures: bool = True,
    jobs: int | str | None = 1,
    desc: str = "compare",
) -> dict:
    """Train one model per (activation, seed), then write ``results.json``, ``report.md`` and figures.

    ``config``: base config file (default :data:`BASE_CONFIG`: vit_micro on
    digits, patch 1 = 65 tokens, 15 epochs, best-validation epoch scored on the
    test split); ``dataset``/``model``/``epochs`` override
    data.name, model.name and train.epochs; ``overrides`` are ``key=value``
    strings applied last. ``norm_every``: diagnostics.every for runs whose
    config records no norms. ``resume``: reuse finished runs in ``out_dir``
    and continue interrupted ones. ``jobs``: runs trained at once, one process
    each ("auto" or None: one per core at the config's ``train.num_threads``,
    as the command line does). Several jobs spawn worker processes, which
    import the calling script again: call it under ``if __name__ == "__main__":``.
    ``desc`` labels the progress bar.
    Returns the results (also in
    ``results.json``), with ``table_text`` for the terminal.

    Bad activation specs, seeds or config keys raise (CompareError /
    ConfigError) before any training starts.
    """
    t0 = time.perf_counter()
    specs = parse_activations(activations)
    seed_list = parse_seeds(seeds)
    n_jobs = check_jobs(jobs)
    if isinstance(norm_every, bool) or not isinstance(norm_every, int) or norm_every < 0:
        raise CompareError(f"norm_every must be an integer >= 0 (0 = no norm curves), got {norm_every!r}")
    path, layers = base_overrides(config, dataset, model, epochs, overrides, norm_every or None)
    grid = [GridRun(f"{get_activation(a).slug}-s{s}", a, s) for a in specs for s in seed_list]
    out = Path(out_dir)
    # One comparison at a time in out: a second one would plan against runs the first is writing.
    with RunDirLock(out, "polyattn compare", command="compare"):
        planned = plan_runs(grid, path, layers, out, resume)

        n_jobs = default_jobs(planned) if n_jobs is None else n_jobs
        records = run_grid(planned, progress=progress, desc=desc, jobs=n_jobs)
        base = planned[0].cfg
        results: dict[str, Any] = {
            "kind": "compare",
            "out_dir": str(out),
            "settings": {
                "activations": specs,
                "seeds": seed_list,
                "dataset": base["data"]["name"],
                "model": base["model"]["name"],
                "epochs": base["train"]["epochs"],
                "config": str(config) if config is not None else BASE_CONFIG_NAME,
                "overrides": list(overrides),
                "norm_every": base["diagnostics"]["every"],
                "jobs": n_jobs,
                "amp": base["train"]["amp"],
                "amp_setting": load_config(path, layers)["train"]["amp"],
            },
            "metric": metric_words(records),
            "base_config": {k: v for k, v in base.items() if k != "description"},
            "table": summarize(records, specs),
            "runs": [{**r, "run_dir": relative_path(r["run_dir"], out)} for r in records],
            "machine": machine_info(),
            # The grid's record: threads, precision and backends are the runs' own, from their summaries
            # (this process's torch threads say nothing about them).
            "record": run_record(precision=base["train"]["amp"], **{"threads": None, **runs_digest(records)}),
        }
        results["table_text"] = format_table(results["table"], results["metric"])
        if figures:
            results["figures"], results["notes"] = write_compare_figures(results, out, progress=progress)
        else:
            results["figures"], results["notes"] = {}, ["figures were not requested"]
        results["time_s"] = time.perf_counter() - t0
        atomic_write_text(compare_markdown(results, out), out / "report.md")
        atomic_write_json(json_safe(results), out / "results.json")
        return results


_WHEN = {"best_val": "at the epoch with the best validation accuracy", "last": "after the last epoch"}


def metric_words(records: Sequence[dict]) -> str:
    metrics, selects = {r["metric"] for r in records}, {r.get("select", "last") for r in records}
    when = _WHEN.get(next(iter(selects)), "") if len(selects) == 1 else "at each run's selected epoch"
    if metrics == {"test_acc"}:
        return f"top-1 accuracy on the test split {when}"
    if metrics == {"selected_val_acc"}:
        return f"top-1 accuracy on the validation split {when} (no test split: chosen and scored on one split)"
    if metrics == {"final_val_acc"}:
        return f"top-1 accuracy on the validation split {when}"
    return f"top-1 accuracy {when} (test split where the dataset has one, else validation)"


def json_safe(obj: Any) -> Any:
    """NaN and infinities as null: results.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
