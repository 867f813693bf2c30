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

The grid of runs is planned and trained by :mod:`polyattn.training.grid`, as for
the scale sweep (:mod:`polyattn.experiments.sweep`) and recall; the base config
without ``--config`` is :data:`BASE_CONFIG`, a config file shipped in the package.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..core.activations import Activation
from ..training.config import load_config
from ..training.grid import (
    GridError,
    GridRun,
    Overrides,
    activation_axis,
    check_jobs,
    default_jobs,
    grid_results,
    merge_layers,
    override_layer,
    override_words,
    parse_seeds,
    plan_runs,
    reserve_keys,
    run_grid,
    write_results,
)
from ..utils import RunDirLock
from .report import compare_markdown, format_table, write_compare_figures

__all__ = [
    "BASE_CONFIG",
    "DEFAULT_ACTIVATIONS",
    "DEFAULT_NORM_EVERY",
    "DEFAULT_SEEDS",
    "base_overrides",
    "compare",
    "format_table",
    "mean_std",
    "paired_difference",
    "summarize",
    "t_interval",
]

# The paper's Table 1 set (softmax, x^3/16, x^3, x/16, x) and the theory's own scale, 1/sqrt(N).
DEFAULT_ACTIVATIONS: tuple[str, ...] = ("softmax", "x^3/sqrt(N)", "x^3/16", "x^3", "x/sqrt(N)", "x/16", "x")
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
# Recording every 5 of the 255 steps of a default run gives 51 points per curve:
# smooth curves for a cost lost in the timing noise.
DEFAULT_NORM_EVERY = 5

# The comparison's base config when no --config is given: the settings of configs/digits_vit_micro.yaml
# (a test keeps the two equal) in a file of the package, so that an installed polyattn does not need
# the repository's configs/ directory.
BASE_CONFIG = Path(__file__).with_name("configs") / "compare.yaml"
BASE_CONFIG_NAME = "built-in digits + vit_micro (= configs/digits_vit_micro.yaml)"

# Keys the comparison sets per run; --set must not fight over them.
_OWNED_KEYS = {"model.activation": "--activations", "train.seed": "--seeds"}


def check_epochs(epochs: int | None) -> int | None:
    """``epochs`` (None: the config's own), or GridError for anything but a positive integer."""
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise GridError(f"--epochs must be a positive integer, got {epochs!r}")
    return epochs


def check_norm_every(norm_every: int) -> int:
    """``norm_every``, or GridError for anything but an integer >= 0."""
    if isinstance(norm_every, bool) or not isinstance(norm_every, int) or norm_every < 0:
        raise GridError(f"norm_every must be an integer >= 0 (0 = no norm curves), got {norm_every!r}")
    return norm_every


def base_overrides(
    config: str | os.PathLike | None = None,
    dataset: str | None = None,
    model: str | None = None,
    epochs: int | None = None,
    overrides: Overrides = (),
    norm_every: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """(config file, the ``{"a.b": value}`` overrides) every run of a comparison starts from.

    Layers, later winning: ``config`` (or :data:`BASE_CONFIG`), ``dataset``,
    ``model``, ``epochs``, ``norm_every`` (only where the config records no
    norms), then ``overrides`` (``key=value`` strings or mappings, see
    :func:`polyattn.training.grid.override_layer`). Raises GridError for keys
    the comparison sets per run and ConfigError for bad keys or values.
    """
    user = override_layer(overrides)
    reserve_keys(user, _OWNED_KEYS, "run by the comparison")
    own: dict[str, Any] = {}
    if dataset is not None:
        own["data.name"] = dataset
    if model is not None:
        own["model.name"] = model
    if check_epochs(epochs) is not None:
        own["train.epochs"] = epochs
    path = str(BASE_CONFIG if config is None else config)
    # Only where the config records no norms: a config that sets diagnostics.every keeps its own.
    if norm_every is not None and load_config(path, merge_layers(own, user))["diagnostics"]["every"] == 0:
        own["diagnostics.every"] = norm_every
    return path, merge_layers(own, user)


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


# --------------------------------------------------------------------------- #
# The comparison
# --------------------------------------------------------------------------- #
def compare(
    out_dir: str | os.PathLike = "runs/compare",
    activations: Iterable[str | Activation] | str = DEFAULT_ACTIVATIONS,
    seeds: int | str | Sequence[int] = DEFAULT_SEEDS,
    dataset: str | None = None,
    model: str | None = None,
    epochs: int | None = None,
    config: str | os.PathLike | None = None,
    overrides: Overrides = (),
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
    data.name, model.name and train.epochs; ``overrides`` (``key=value``
    strings, ``{"a.b": value}`` mappings) are applied last. ``norm_every``:
    diagnostics.every for runs whose config records no norms. ``resume``: reuse
    finished runs in ``out_dir`` and continue interrupted ones. ``jobs``: runs
    trained at once, one process each ("auto" or None: one per core at the
    config's ``train.num_threads``, as the command line does). Several jobs
    spawn worker processes, which import the calling script again: call it
    under ``if __name__ == "__main__":``. ``desc`` labels the progress bar.
    Returns the results (also in ``results.json``), with ``table_text`` for the terminal.

    Bad activation specs, seeds or config keys raise (GridError /
    ConfigError) before any training starts.
    """
    t0 = time.perf_counter()
    acts = activation_axis(activations)
    seed_list = parse_seeds(seeds)
    n_jobs = check_jobs(jobs)
    check_norm_every(norm_every)
    path, layer = base_overrides(config, dataset, model, epochs, overrides, norm_every or None)
    grid = [GridRun(f"{a.slug}-s{s}", a.spec, s) for a in acts for s in seed_list]
    out = Path(out_dir)
    # One comparison at a time in out: a second one would plan against runs the first is writing.
    with RunDirLock(out, "polyattn compare", command="compare"):
        planned = plan_runs(grid, path, layer, out, resume)
        n_jobs = default_jobs(planned) if n_jobs is None else n_jobs
        records = run_grid(planned, progress=progress, desc=desc, jobs=n_jobs)
        base, specs = planned[0].cfg, [a.spec for a in acts]
        settings = {
            "activations": specs,
            "seeds": seed_list,
            "dataset": base["data"]["name"],
            "model": base["model"]["name"],
            "epochs": base["train"]["epochs"],
            "config": str(config) if config is not None else BASE_CONFIG_NAME,
            "overrides": override_words(overrides),
            "norm_every": base["diagnostics"]["every"],
            "jobs": n_jobs,
            "amp": base["train"]["amp"],
            "amp_setting": load_config(path, layer)["train"]["amp"],
        }
        results = grid_results("compare", out, settings, records, base, summarize(records, specs))
        results["table_text"] = format_table(results["table"], results["metric"])
        if figures:
            results["figures"], results["notes"] = write_compare_figures(results, out, progress=progress)
        else:
            results["figures"], results["notes"] = {}, ["figures were not requested"]
        return write_results(results, out, lambda r: compare_markdown(r, out), t0)
