"""Compare attention activations: one model per activation and seed, then a table and a report.

    from polyattn.experiments.compare import compare
    results = compare("runs/compare")   # digits, vit_micro; softmax, x^3/sqrt(N), x^3, x/sqrt(N), x; 3 seeds
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
from ..training.config import ConfigError, dump_config, load_config, resolve_config
from ..training.trainer import CHECKPOINT, train
from ..utils import RunDirLock, atomic_write_json, atomic_write_text
from ..utils.format import fmt_pct
from ..utils.machine import machine_info
from .report import compare_markdown, format_table, write_compare_figures

__all__ = [
    "BASE_CONFIG",
    "DEFAULT_ACTIVATIONS",
    "DEFAULT_NORM_EVERY",
    "DEFAULT_SEEDS",
    "CompareError",
    "GridRun",
    "base_overrides",
    "compare",
    "format_table",
    "json_safe",
    "mean_std",
    "paired_difference",
    "parse_activations",
    "parse_seeds",
    "plan_runs",
    "relative_path",
    "run_grid",
    "summarize",
    "t_interval",
]

DEFAULT_ACTIVATIONS: tuple[str, ...] = ("softmax", "x^3/sqrt(N)", "x^3", "x/sqrt(N)", "x")
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
# Recording every 5 of the 460 steps of a default run gives 92 points per curve:
# smooth curves for a cost lost in the timing noise.
DEFAULT_NORM_EVERY = 5

# The comparison's base config when no --config is given: the same settings as
# configs/digits_vit_micro.yaml (a test keeps the two equal), held here so that
# an installed polyattn does not need the repository's configs/ directory.
BASE_CONFIG: dict[str, Any] = {
    "model": {"name": "vit_micro", "activation": "softmax", "overrides": {"patch_size": 2}},
    "data": {"name": "digits", "val_fraction": 0.2, "seed": 0, "augment": "none"},
    "train": {
        "epochs": 20,
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
    },
    "diagnostics": {"every": 0},
}
BASE_CONFIG_NAME = "built-in digits + vit_micro (= configs/digits_vit_micro.yaml)"

# Keys whose change does not change a run's numbers: a resumed comparison may differ in them.
_RESUME_IGNORED = {"description", "train.num_threads", "data.num_workers", "train.device"}
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


def _changed(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for k in sorted(set(old) | set(new), key=str):
            keys += _changed(old.get(k), new.get(k), f"{prefix}{k}.")
        return keys
    key = prefix.rstrip(".")
    return [] if old == new or key in _RESUME_IGNORED else [f"{key}: {old!r} (on disk) vs {new!r} (now)"]


def _normalised(cfg: dict) -> dict:
    return yaml.safe_load(dump_config(cfg)) or {}


def _saved_config(path: Path) -> dict:
    """A run's config.yaml with the defaults of keys added since it was written: a key it lacks ran
    with the behaviour that key's default names, so a missing key is not a change."""
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        return _normalised(resolve_config(saved))
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
            cfg = load_config(config, run_overrides, point=run.point)
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
                    raise CompareError(
                        f"{run_dir} was made with another config, so --resume cannot reuse it:\n  "
                        + "\n  ".join(diff)
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
    metric = "test_acc" if summary.get("test_acc") is not None else "final_val_acc"
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
    }


def run_grid(planned: Sequence[PlannedRun], progress: bool = True, desc: str = "runs") -> list[dict]:
    """Train (or reuse) every planned run in order; one record per run (see ``_record``).

    An overall bar counts runs; the trainer's own epoch bars run inside it.
    """
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
                summary = json.loads((p.run_dir / "summary.json").read_text(encoding="utf-8"))
                status = "reused"
            else:
                summary = train(p.cfg, p.run_dir, resume=p.state == "resume", progress=progress)
                status = "resumed" if p.state == "resume" else "trained"
            rec = _record(p, summary, status)
            records.append(rec)
            if progress:
                result = f"diverged at step {rec['diverged_step']}" if rec["diverged"] else fmt_pct(rec["top1"])
                tqdm.write(f"[{len(records)}/{len(planned)}] {p.run.name}: {result} ({status})", file=sys.stderr)
            bar.update(1)
    finally:
        bar.close()
    return records


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
) -> dict:
    """Train one model per (activation, seed), then write ``results.json``, ``report.md`` and figures.

    ``config``: base config file (default :data:`BASE_CONFIG`: vit_micro on
    digits, patch 2, 20 epochs); ``dataset``/``model``/``epochs`` override
    data.name, model.name and train.epochs; ``overrides`` are ``key=value``
    strings applied last. ``norm_every``: diagnostics.every for runs whose
    config records no norms. ``resume``: reuse finished runs in ``out_dir``
    and continue interrupted ones. Returns the results (also in
    ``results.json``), with ``table_text`` for the terminal.

    Bad activation specs, seeds or config keys raise (CompareError /
    ConfigError) before any training starts.
    """
    t0 = time.perf_counter()
    specs = parse_activations(activations)
    seed_list = parse_seeds(seeds)
    if isinstance(norm_every, bool) or not isinstance(norm_every, int) or norm_every < 0:
        raise CompareError(f"norm_every must be an integer >= 0 (0 = no norm curves), got {norm_every!r}")
    path, layers = base_overrides(config, dataset, model, epochs, overrides, norm_every or None)
    grid = [GridRun(f"{get_activation(a).slug}-s{s}", a, s) for a in specs for s in seed_list]
    out = Path(out_dir)
    # One comparison at a time in out: a second one would plan against runs the first is writing.
    with RunDirLock(out, "polyattn compare"):
        planned = plan_runs(grid, path, layers, out, resume)

        records = run_grid(planned, progress=progress, desc="compare")
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
            },
            "metric": _metric_words(records),
            "base_config": {k: v for k, v in base.items() if k != "description"},
            "table": summarize(records, specs),
            "runs": [{**r, "run_dir": relative_path(r["run_dir"], out)} for r in records],
            "machine": machine_info(),
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


def _metric_words(records: Sequence[dict]) -> str:
    kinds = {r["metric"] for r in records}
    if kinds == {"test_acc"}:
        return "top-1 accuracy on the test split after the last epoch"
    if kinds == {"final_val_acc"}:
        return "top-1 accuracy on the validation split after the last epoch"
    return "top-1 accuracy after the last epoch (test split where the dataset has one, else validation)"


def json_safe(obj: Any) -> Any:
    """NaN and infinities as null: results.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
