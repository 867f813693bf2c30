"""The paper's Figure 1 at CPU scale: accuracy against the scale 1/k of x^3 for several sequence lengths.

    from polyattn.experiments.sweep import sweep
    results = sweep("runs/sweep")    # digits at 16x16, patch 8/4/2/1 = 4/16/64/256 patches, k = 1, 2, ..., 64
    print(results["table_text"])

Each (patch size, k, seed) is one run of ``x^P/k`` (P = 3 by default; k = 1
is plain ``x^P``) through the polyattn trainer, plus one softmax run per
patch size as a reference (``baseline``). The paper's claim: the k that
trains best grows with the sequence length (the theory's scale is
1/sqrt(N)). Runs, resume and divergence work as in :mod:`.compare`; the
output directory holds ``runs/``, ``results.json``, ``report.md`` and
``sweep.png``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.activations import MAX_POWER, Activation, get_activation
from ..training.config import load_config
from ..training.grid import (
    GridError,
    GridRun,
    Overrides,
    axis_values,
    check_jobs,
    default_jobs,
    grid_results,
    override_items,
    override_words,
    parse_seeds,
    plan_runs,
    run_grid,
    write_results,
)
from ..utils import RunDirLock
from .compare import base_overrides, mean_std
from .report import plot_scale_sweep, sweep_markdown

__all__ = [
    "DEFAULT_PATCH_SIZES",
    "DEFAULT_SCALES",
    "DEFAULT_SWEEP_EPOCHS",
    "DEFAULT_SWEEP_IMAGE_SIZE",
    "format_sweep_table",
    "scale_spec",
    "summarize_sweep",
    "sweep",
]

DEFAULT_SCALES: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)
# Digits resized to 16x16: patch 8, 4, 2, 1 give 4, 16, 64 and 256 patches, the
# paper's Figure 1 lengths (8, 16, 64, 256 tokens) but for 8, which a square patch
# of a square image cannot give.
DEFAULT_SWEEP_IMAGE_SIZE = 16
DEFAULT_PATCH_SIZES: tuple[int, ...] = (8, 4, 2, 1)
# The comparison's base config trains every activation at 65 tokens in 15 epochs.
DEFAULT_SWEEP_EPOCHS: int | None = None


def _scaled(power: int, k: float) -> Activation:
    base = "x" if power == 1 else f"x^{power}"
    return get_activation(base if k == 1 else f"{base}/{k:g}")


def scale_spec(power: int, k: float) -> str:
    """The activation spec of x^power scaled by 1/k (``x^3/8``; k = 1 gives ``x^3``)."""
    return _scaled(power, k).spec


def _scale(k: Any) -> float:
    try:
        v = float(k)
    except (TypeError, ValueError):
        raise GridError(f"--scales: {k!r} is not a number; give k values such as 1,2,4,8") from None
    if not (math.isfinite(v) and v > 0):
        raise GridError(f"--scales: k must be a positive number (the scale is 1/k), got {k!r}")
    return int(v) if v.is_integer() else v


def _check_scales(scales: Sequence[float]) -> list[float]:
    twice = "k = {value:g} is listed twice"
    return axis_values(scales, "--scales", _scale, twice, "at least one k is needed, e.g. --scales 1,4,16")


def _image_size(config: str, layer: dict[str, Any]) -> tuple[int, int]:
    """The (H, W) of the base config's images, from its dataset (cheap for generated and bundled data)."""
    from ..data.registry import build_dataset

    cfg = load_config(config, layer)
    size = build_dataset(cfg["data"], cfg["train"]["seed"]).model_overrides.get("img_size")
    if size is None:
        raise GridError(
            f"the sweep varies the ViT patch size and needs an image dataset; {cfg['data']['name']!r} gives no img_size"
        )
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_patch_sizes(patch_sizes: Sequence[int], image: tuple[int, int]) -> list[int]:
    def patch(p: Any) -> int:
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise GridError(f"--patch-sizes: patch sizes must be positive integers, got {p!r}")
        if image[0] % p or image[1] % p:
            fits = [q for q in range(1, min(image) + 1) if image[0] % q == 0 and image[1] % q == 0]
            raise GridError(
                f"--patch-sizes: patch {p} does not tile the {image[0]}x{image[1]} images; choose from {fits}"
            )
        return p

    return axis_values(
        patch_sizes, "--patch-sizes", patch, "{value} is listed twice", "at least one patch size is needed"
    )


def sweep(
    out_dir: str | os.PathLike = "runs/sweep",
    scales: Sequence[float] = DEFAULT_SCALES,
    patch_sizes: Sequence[int] = DEFAULT_PATCH_SIZES,
    power: int = 3,
    seeds: int | str | Sequence[int] = 1,
    epochs: int | None = DEFAULT_SWEEP_EPOCHS,
    image_size: int | None = DEFAULT_SWEEP_IMAGE_SIZE,
    dataset: str | None = None,
    model: str | None = None,
    config: str | os.PathLike | None = None,
    overrides: Overrides = (),
    baseline: bool = True,
    resume: bool = False,
    progress: bool = True,
    jobs: int | str | None = 1,
) -> dict:
    """Train ``x^power/k`` for every k in ``scales`` and patch size in ``patch_sizes`` (and softmax per patch size).

    The base config is as in :func:`.compare.compare` (default: vit_micro on
    digits); ``image_size`` sets ``data.image_size`` (None: the config's own);
    ``model.overrides.patch_size`` is set per run; ``overrides`` and ``jobs`` as in
    :func:`.compare.compare`. Writes
    ``results.json``, ``report.md`` and ``sweep.png`` into ``out_dir`` and
    returns the results. All argument errors come before any training.
    """
    t0 = time.perf_counter()
    if isinstance(power, bool) or not isinstance(power, int) or not 1 <= power <= MAX_POWER:
        raise GridError(f"--power must be an integer in 1..{MAX_POWER}, got {power!r}")
    ks = _check_scales(scales)
    seed_list = parse_seeds(seeds)
    n_jobs = check_jobs(jobs)
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise GridError(f"--image-size must be a positive integer, got {image_size!r}")
        # Before the user's --set, so that an explicit data.image_size there wins.
        overrides = [{"data.image_size": image_size}, *override_items(overrides)]
    path, layer = base_overrides(config, dataset, model, epochs, overrides)
    image = _image_size(path, layer)
    patches = _check_patch_sizes(patch_sizes, image)

    grid = sweep_grid(patches, ks, power, seed_list, image, baseline)
    out = Path(out_dir)
    # One comparison at a time in out: a second one would plan against runs the first is writing.
    with RunDirLock(out, "polyattn sweep", command="sweep"):
        planned = plan_runs(grid, path, layer, out, resume)
        n_jobs = default_jobs(planned) if n_jobs is None else n_jobs
        records = run_grid(planned, progress=progress, desc="sweep", jobs=n_jobs)
        settings = {
            "power": power,
            "scales": ks,
            "patch_sizes": patches,
            "image_size": list(image),
            "jobs": n_jobs,
            "seeds": seed_list,
            "baseline": baseline,
            "config": str(config) if config is not None else "built-in digits + vit_micro",
            "overrides": override_words(overrides),
        }
        results = _results(out, records, planned[0].cfg, settings)
        return write_results(results, out, lambda r: sweep_markdown(r, out), t0)


def sweep_grid(
    patches: Sequence[int],
    ks: Sequence[float],
    power: int,
    seeds: Sequence[int],
    image: tuple[int, int],
    baseline: bool,
) -> list[GridRun]:
    """One run per (patch size, x^power/k or softmax, seed), labelled with its token count and k."""
    acts = [(_scaled(power, k), k) for k in ks] + ([(Activation("softmax"), None)] if baseline else [])
    grid = []
    for p in patches:
        tokens = (image[0] // p) * (image[1] // p)
        for act, k in acts:
            for s in seeds:
                labels = {"patch_size": p, "tokens": tokens, "k": k}
                grid.append(GridRun(f"p{p}-{act.slug}-s{s}", act.spec, s, {"model.overrides.patch_size": p}, labels))
    return grid


def _results(out: Path, records: list[dict], base: dict, settings: dict) -> dict:
    """results.json of a sweep (without its timing), with the table text; writes the figure."""
    table = summarize_sweep(records, settings["patch_sizes"], settings["scales"])
    settings = {
        **settings,
        "dataset": base["data"]["name"],
        "model": base["model"]["name"],
        "epochs": base["train"]["epochs"],
        "amp": base["train"]["amp"],
    }
    results = grid_results("sweep", out, settings, records, base, table)
    results["table_text"] = format_sweep_table(table, settings["scales"], settings["power"])
    results["figures"] = {"sweep": plot_scale_sweep(results, out / "sweep.png").name}
    return results


def summarize_sweep(records: Sequence[dict], patch_sizes: Sequence[int], scales: Sequence[float]) -> list[dict]:
    """One row per patch size: mean/std/diverged per k, the softmax reference, and the best k."""
    rows = []
    for p in patch_sizes:
        recs = [r for r in records if r["patch_size"] == p]

        def cell(rs: list[dict]) -> dict:
            ok = [r["top1"] for r in rs if not r["diverged"] and r["top1"] is not None]
            mean, std = mean_std(ok)
            return {"mean": mean, "std": std, "n": len(ok), "runs": len(rs), "diverged": sum(r["diverged"] for r in rs)}

        cells = {f"{k:g}": cell([r for r in recs if r["k"] == k]) for k in scales}
        soft = [r for r in recs if r["k"] is None]
        scored = [(c["mean"], -float(k)) for k, c in cells.items() if c["mean"] is not None]
        best = None if not scored else f"{-max(scored)[1]:g}"  # highest mean; ties go to the smaller k
        rows.append(
            {
                "patch_size": p,
                "tokens": recs[0]["tokens"] if recs else None,
                "cells": cells,
                "softmax": cell(soft) if soft else None,
                "best_k": best,
            }
        )
    return rows


def format_sweep_table(rows: Sequence[dict], scales: Sequence[float], power: int) -> str:
    """Fixed-width text: one row per sequence length, one column per k (mean top-1 %, 'div' if all diverged)."""

    def text(c: dict | None) -> str:
        if c is None:
            return "-"
        if c["mean"] is None:
            return "div" if c["diverged"] else "-"
        mark = "*" if c["diverged"] else ""
        return f"{100 * c['mean']:.1f}{mark}"

    base = "x" if power == 1 else f"x^{power}"
    header = ["patches", *(f"k={k:g}" for k in scales), "softmax", "best k"]
    lines = [header]
    for r in rows:
        lines.append(
            [
                f"{r['tokens']} (p{r['patch_size']})",
                *(text(r["cells"][f"{k:g}"]) for k in scales),
                text(r["softmax"]),
                r["best_k"] or "-",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append(
        f"top-1 % of {base}/k (mean over seeds that did not diverge; 'div': all diverged, '*': some did); "
        "patches = sequence length without the class token"
    )
    return "\n".join(out)
