"""A grid of training runs: every run's config and directory planned first, then each run trained or reused.

    from polyattn.training.grid import GridRun, activation_axis, plan_runs, run_grid
    runs = [GridRun(f"{a.slug}-s{s}", a.spec, s) for a in activation_axis("softmax,x^3/sqrt(N)") for s in (0, 1)]
    records = run_grid(plan_runs(runs, "configs/digits_vit_micro.yaml", {"train.epochs": 3}, "runs/mine", False))

Every run goes through the polyattn trainer (:func:`polyattn.training.train`) into
``OUT/runs/<name>/``. Config errors and a directory that does not fit the request are raised
before any run trains; with ``resume`` a finished run is reused and an interrupted one continued
from its checkpoint, both only where the saved config equals the requested one. Several runs
may train at once, one process each (``jobs``); a run's numbers do not depend on it.

``polyattn compare``, ``sweep`` and ``recall`` (:mod:`polyattn.experiments`) and
``polyattn train --all-points`` all train their grids here. Overrides travel as
``{"a.b": value}`` mappings: ``key=value`` text is parsed once, where it enters
(:func:`override_layer`), and activations once, by :func:`activation_axis`.
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from ..core.activations import Activation, get_activation
from ..utils import atomic_write_json, atomic_write_text
from ..utils.format import fmt_pct
from ..utils.machine import cpu_class, machine_info
from ..utils.record import run_facts, run_record, runs_digest
from .checkpoint import config_changes
from .config import REUSABLE, ConfigError, dump_config, load_config, parse_override, resolve_config, trainer_schema
from .estimate import GridClock, fmt_duration, probe_run
from .precision import PRECISION_WORDS, legacy_auto, resolve_run_precision, silence_emulation_warning
from .trainer import CHECKPOINT, train

__all__ = [
    "GridError",
    "GridRun",
    "Overrides",
    "PlannedRun",
    "activation_axis",
    "axis_values",
    "check_jobs",
    "default_jobs",
    "grid_results",
    "json_safe",
    "merge_layers",
    "metric_words",
    "override_items",
    "override_layer",
    "override_words",
    "parse_activations",
    "parse_seeds",
    "plan_runs",
    "relative_path",
    "reserve_keys",
    "run_grid",
    "usable_cores",
    "write_results",
]


class GridError(ValueError):
    """A bad argument of a grid or an output directory that does not fit the request; the message says the fix."""


# --------------------------------------------------------------------------- #
# Arguments: the axes of a grid and its overrides
# --------------------------------------------------------------------------- #
def axis_values(values: Iterable[Any], flag: str, check: Callable[[Any], Any], twice: str, empty: str) -> list:
    """``check(v)`` of every value (it raises GridError for a bad one), in order; GridError for a value
    listed twice (``twice`` is formatted with ``value`` as given and ``kept``, what check returned) or none."""
    out: list = []
    for value in values:
        kept = check(value)
        if kept in out:
            raise GridError(f"{flag}: " + twice.format(value=value, kept=kept))
        out.append(kept)
    if not out:
        raise GridError(f"{flag}: {empty}")
    return out


def _parsed_activation(item: str | Activation) -> Activation:
    try:
        return get_activation(item)
    except ValueError as e:
        raise GridError(f"--activations: {e}") from None


def activation_axis(specs: Iterable[str | Activation] | str) -> list[Activation]:
    """The activations of a grid from spec strings (each may hold several, comma-separated) or
    :class:`Activation` objects (taken as they are): each string is parsed once, here.

    Raises GridError naming the bad spec (with the accepted forms) or a duplicate.
    """
    if isinstance(specs, str):
        specs = [specs]
    items = [
        part
        for a in specs
        for part in ([a] if isinstance(a, Activation) else [s.strip() for s in str(a).split(",") if s.strip()])
    ]
    return axis_values(
        items,
        "--activations",
        _parsed_activation,
        "{value!r} is listed twice (as {kept.spec!r}); list each activation once",
        "no activation given; e.g. --activations softmax,x^3/sqrt(N)",
    )


def parse_activations(specs: Iterable[str | Activation] | str) -> list[str]:
    """Canonical activation specs (see :func:`activation_axis`)."""
    return [a.spec for a in activation_axis(specs)]


def parse_seeds(value: int | str | Sequence[int]) -> list[int]:
    """Seeds from a count (``3`` -> 0, 1, 2), a comma list (``"0,5,7"``, ``"5,"``) or a sequence of ints."""
    if isinstance(value, str):
        text = value.replace(" ", "")
        try:
            seeds = [int(v) for v in text.split(",") if v] if "," in text else list(range(int(text)))
        except ValueError:
            raise GridError(
                f"--seeds: expected a count such as 3 (seeds 0, 1, 2) or a comma list such as 0,5,7, got {value!r}"
            ) from None
    elif isinstance(value, int) and not isinstance(value, bool):
        seeds = list(range(value))
    else:
        seeds = [int(v) for v in value]
    if not seeds:
        raise GridError("--seeds: at least one seed is needed (e.g. --seeds 3, or --seeds 0,)")
    bad = [s for s in seeds if s < 0]
    if bad:
        raise GridError(f"--seeds: seeds must be >= 0, got {bad}")
    if len(set(seeds)) != len(seeds):
        raise GridError(f"--seeds: seed listed twice in {seeds}")
    return seeds


def check_jobs(jobs: int | str | None) -> int | None:
    """``jobs`` as a positive int, or None for :func:`default_jobs`; GridError for anything else."""
    if jobs is None or jobs == "auto":
        return None
    try:
        value = int(jobs)
    except (TypeError, ValueError):
        value = 0
    if isinstance(jobs, bool) or value < 1 or str(value) != str(jobs).strip():
        raise GridError(f"--jobs must be a positive integer or auto (one run per core), got {jobs!r}")
    return value


def merge_layers(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Override mappings merged, later winning; a key set again moves to the end, so that applying the
    result in order gives what applying every layer in turn gives (a data.name change drops the data
    keys the new dataset does not accept, whatever came before it)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            out.pop(key, None)
            out[key] = value
    return out


# A grid's overrides: ``a.b=value`` strings (a command line's --set) and ``{"a.b": value}`` mappings, in order.
Overrides = Sequence[str | Mapping[str, Any]] | Mapping[str, Any]


def override_layer(overrides: Overrides = ()) -> dict[str, Any]:
    """One ``{"a.b": value}`` mapping from ``overrides``: each string parsed once (its value as YAML),
    later items winning (see :func:`merge_layers`)."""
    return merge_layers(
        *(item if isinstance(item, Mapping) else _parsed_override(item) for item in override_items(overrides))
    )


def override_items(overrides: Overrides = ()) -> list[str | Mapping[str, Any]]:
    """``overrides`` as a list of items (a lone mapping is one item), to put a layer before or after them."""
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of key=value strings or a mapping, got the string {overrides!r}")
    return [overrides] if isinstance(overrides, Mapping) else list(overrides)


def _parsed_override(text: str) -> dict[str, Any]:
    parts, value = parse_override(text)
    return {".".join(parts): value}


def override_words(overrides: Overrides = ()) -> list[str]:
    """``overrides`` as the ``key=value`` words of a command line's --set (what a report prints to rerun
    a grid): strings as given, mappings with their values written as YAML."""
    return [
        word
        for item in override_items(overrides)
        for word in ([f"{k}={_yaml_word(v)}" for k, v in item.items()] if isinstance(item, Mapping) else [item])
    ]


def _yaml_word(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31).strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text


def reserve_keys(layer: Mapping[str, Any], owned: Mapping[str, str], by: str) -> None:
    """GridError where ``layer`` sets a key the grid sets itself (``owned``: key -> the flag to use)."""
    for key, value in layer.items():
        if key in owned:
            raise GridError(f"--set {key}={_yaml_word(value)}: {key} is set per {by}; use {owned[key]}")


# --------------------------------------------------------------------------- #
# Planning
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class GridRun:
    """One training run of a grid: its directory name, activation, seed, extra overrides, grid point.

    ``activation`` is a canonical spec (see :func:`activation_axis`); ``activation``/``seed`` None
    leave the config's own; ``overrides`` is a ``{"a.b": value}`` mapping applied after them;
    ``point`` picks a point of a grid config file.
    """

    name: str
    activation: str | None
    seed: int | None
    overrides: Mapping[str, Any] = field(default_factory=dict, hash=False)
    labels: dict = field(default_factory=dict, compare=False, hash=False)  # copied into the run's record
    point: str | None = None


@dataclass
class PlannedRun:
    run: GridRun
    cfg: dict
    run_dir: Path
    state: str  # "new": train; "resume": continue from its checkpoint; "done": reuse summary.json


def plan_runs(
    runs: Sequence[GridRun],
    config: str | os.PathLike | None,
    overrides: Mapping[str, Any],
    out_dir: str | os.PathLike,
    resume: bool,
) -> list[PlannedRun]:
    """Resolve every run's config and decide what to do with it; all errors come before any training.

    A run's config: ``config`` (a file, or None for the defaults), then ``overrides``, then the run's
    activation, seed and own overrides. Without ``resume``, a run directory that already holds a
    checkpoint or a summary is an error. With it, a finished run is reused and an interrupted one
    continued, both only if their saved config equals the requested one.
    """
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise GridError(f"two runs share a directory name in {names}")
    root = Path(out_dir) / "runs"
    planned, existing = [], []
    for run in runs:
        own = {"model.activation": run.activation, "train.seed": run.seed}
        layer = merge_layers(overrides, {k: v for k, v in own.items() if v is not None}, run.overrides)
        try:
            # auto precision resolved here, once for the grid: each run records what it computes in.
            cfg = resolve_run_precision(load_config(config, layer, point=run.point))
        except ConfigError as e:
            raise ConfigError(f"run {run.name}: {e}") from None
        run_dir = root / run.name
        finished = (run_dir / "summary.json").is_file()
        started = finished or (run_dir / CHECKPOINT).is_file()
        if started and not resume:
            existing.append(run.name)
        state = "new"
        if started and resume:
            _check_saved(run_dir, cfg, out_dir)
            state = "done" if finished else "resume"
        planned.append(PlannedRun(run, cfg, run_dir, state))
    if existing:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise GridError(
            f"{out_dir} already holds runs of this comparison ({shown}); pass --resume to reuse the finished "
            "ones and continue the others, or choose another --out"
        )
    return planned


def _check_saved(run_dir: Path, cfg: dict, out_dir: str | os.PathLike) -> None:
    """GridError where the run directory's saved config differs from ``cfg`` in a key that matters."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    diff = _changed(_saved_config(saved), _normalised(cfg))
    if diff:
        hint = ""
        if any(d.startswith("train.amp:") for d in diff):
            hint = (
                "\n(train.amp=auto resolves by what this machine computes natively; --set train.amp="
                "<the value on disk> continues as the runs began)"
            )
        raise GridError(
            f"{run_dir} was made with another config, so --resume cannot reuse it:\n  "
            + "\n  ".join(diff)
            + hint
            + f"\nrerun with the same settings, or choose another --out than {out_dir}"
        )


def _changed(old: dict, new: dict) -> list[str]:
    # A resumed grid reuses a run only when it differs in keys that change no number (free ones).
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
# Results
# --------------------------------------------------------------------------- #
def grid_results(kind: str, out: Path, settings: dict, records: list[dict], base: dict, table: list[dict]) -> dict:
    """The results.json of a grid in ``out`` (without its timing): ``settings``, the metric's words, the
    base config (``base``: the first run's), ``table``, every run's record and what produced them."""
    return {
        "kind": kind,
        "out_dir": str(out),
        "settings": settings,
        "metric": metric_words(records),
        "base_config": {k: v for k, v in base.items() if k != "description"},
        "table": table,
        "runs": [{**r, "run_dir": relative_path(r["run_dir"], out)} for r in records],
        "machine": machine_info(),
        # The grid's record: threads, precision and backends are the runs' own, from their summaries
        # (this process's torch threads say nothing about them).
        "record": run_record(precision=base["train"]["amp"], **{"threads": None, **runs_digest(records)}),
    }


def write_results(results: dict, out: Path, markdown: Callable[[dict], str], started: float) -> dict:
    """Time ``results`` from ``started`` (a perf_counter reading), write report.md and results.json; results."""
    results["time_s"] = time.perf_counter() - started
    atomic_write_text(markdown(results), out / "report.md")
    atomic_write_json(json_safe(results), out / "results.json")
    return results


def relative_path(path: str | os.PathLike, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (results stay valid when the directory moves)."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


_WHEN = {"best_val": "at the epoch with the best validation accuracy", "last": "after the last epoch"}


def metric_words(records: Sequence[dict]) -> str:
    """What the records' ``top1`` measures, in words (the same for every run, or said to differ)."""
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
