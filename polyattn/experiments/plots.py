"""Plots of attention norms: training curves (the paper's Figures 2-3) and the theory checks.

matplotlib is imported inside each function with the Agg backend, so
importing this module is cheap and works without a display.
"""

from __future__ import annotations

import io
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils.io import atomic_write_bytes

__all__ = ["norm_curves", "plot_loglog_norms", "plot_norm_curves", "plot_softmax_bounds", "pyplot", "save_figure"]


def pyplot() -> Any:
    """matplotlib.pyplot, imported on first use (Agg unless a backend was chosen): --help stays fast."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out_png: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG atomically (a reader never sees half a file) and close it."""
    out = Path(out_png)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(buf.getvalue(), out)
    pyplot().close(fig)
    return out


# --------------------------------------------------------------------------- #
# Training curves from NormRecorder rows
# --------------------------------------------------------------------------- #
RunRows = Mapping[str, Iterable[Mapping[str, Any]]] | Iterable[Mapping[str, Any]]


def norm_curves(rows: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """Head-averaged curves from NormRecorder rows: ``{layer: {"fro"|"jac_fro": [(step, value), ...]}}``.

    Rows without ``fro``/``jac_fro`` (other kinds of metrics.jsonl rows) are
    skipped, so a whole metrics file can be passed in.
    """
    acc: dict[tuple[int, int], dict[str, list[float]]] = defaultdict(lambda: {"fro": [], "jac_fro": []})
    for r in rows:
        if "fro" not in r or "jac_fro" not in r or "layer" not in r or "step" not in r:
            continue
        cell = acc[(int(r["layer"]), int(r["step"]))]
        cell["fro"].append(float(r["fro"]))
        cell["jac_fro"].append(float(r["jac_fro"]))
    curves: dict[int, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: {"fro": [], "jac_fro": []})
    for (layer, step), cell in sorted(acc.items()):
        for key in ("fro", "jac_fro"):
            curves[layer][key].append((step, sum(cell[key]) / len(cell[key])))
    return dict(curves)


def _default_layers(n_layers: int) -> list[int]:
    """All layers when few; else the second, middle and last (the paper shows layers 2, 7, 12 of 12)."""
    if n_layers <= 4:
        return list(range(n_layers))
    return sorted({1, n_layers // 2, n_layers - 1})


def plot_norm_curves(
    rows: RunRows,
    out_png: str | os.PathLike,
    layers: Sequence[int] | None = None,
    title: str | None = None,
    log_y: bool = True,
    dpi: int = 100,
    tokens: int | None = None,
) -> Path:
    """Draw ||A||_F (top row) and ||dA/dS||_F (bottom row) against training step, one column per layer.

    ``tokens``: the sequence length N; when given, the softmax bounds of Theorem 4.1 are drawn as
    dashed lines (||A||_F <= sqrt(N), ||dA/dS||_F <= 2 sqrt(N)) so that each curve can be read
    against them.

    ``rows``: either one run's rows, or a mapping ``label -> rows`` (e.g.
    ``{"softmax": rows_a, "x^3/sqrt(N)": rows_b}``) drawn as one curve per
    label. Rows are NormRecorder rows ({"step", "layer", "head", "fro",
    "jac_fro", ...}); heads are averaged, as in the paper's Figures 2-3;
    other rows (e.g. all of a metrics.jsonl) are ignored. ``layers`` are
    0-based layer indices (default: all if <= 4, else second, middle, last).
    Returns the path written.
    """
    runs = {"run": rows} if not isinstance(rows, Mapping) else rows
    curves = {label: norm_curves(r) for label, r in runs.items()}
    all_layers = sorted({layer for c in curves.values() for layer in c})
    if not all_layers:
        raise ValueError(
            "plot_norm_curves: no norm rows found (rows need 'step', 'layer', 'fro' and 'jac_fro', as "
            "NormRecorder writes them); was the recorder attached and diagnostics.every set?"
        )
    if layers is None:
        layers = [all_layers[i] for i in _default_layers(len(all_layers))]
    missing = [layer for layer in layers if layer not in all_layers]
    if missing:
        raise ValueError(f"plot_norm_curves: layers {missing} have no rows; recorded layers: {all_layers}")

    plt = pyplot()
    ncol = len(layers)
    fig, axes = plt.subplots(2, ncol, figsize=(3.6 * ncol + 0.6, 6.0), squeeze=False, sharex=True)
    for col, layer in enumerate(layers):
        for row, (key, label) in enumerate((("fro", "||A||_F"), ("jac_fro", "||dA/dS||_F"))):
            ax = axes[row][col]
            for run_label, c in curves.items():
                pts = c.get(layer, {}).get(key, [])
                if pts:
                    steps, vals = zip(*pts, strict=True)
                    ax.plot(steps, vals, label=run_label, linewidth=1.4)
            if tokens:
                bound, name = (math.sqrt(tokens), "sqrt(N)") if key == "fro" else (2 * math.sqrt(tokens), "2 sqrt(N)")
                ax.axhline(
                    bound, color="black", linestyle="--", linewidth=1.0, label=f"softmax bound {name}, N={tokens}"
                )
            if log_y:
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if row == 0:
                ax.set_title(f"layer {layer + 1}")
            else:
                ax.set_xlabel("step")
            if col == 0:
                ax.set_ylabel(f"{label} (mean over heads)")
    axes[0][0].legend(fontsize=8)
    if tokens:
        axes[1][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi)


# --------------------------------------------------------------------------- #
# Theory plots (polyattn theory)
# --------------------------------------------------------------------------- #
_LABELS = {
    "fro": "E ||phi(S)||_F",
    "jac_q": "E ||d phi(S) / dQ||_F",
    "jac_s": "E ||d phi(S) / dS||_F",
}


def plot_loglog_norms(mc: Mapping[str, Any], quantity: str, out_png: str | os.PathLike, dpi: int = 100) -> Path:
    """Log-log plot of one Monte Carlo quantity against N for every activation.

    Points are means with 95% intervals, lines the fitted power laws (slope in
    the legend); dashed grey lines are sqrt(N) and 2 sqrt(N), softmax's bounds.
    """
    import numpy as np

    plt = pyplot()
    n = np.asarray(mc["n"], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    fits = {(r["activation"], r["quantity"]): r for r in mc["slopes"]}
    for spec, per_q in mc["stats"].items():
        cells = per_q[quantity]
        mean = np.array([c["mean"] for c in cells])
        lo = np.array([c["ci_low"] for c in cells])
        hi = np.array([c["ci_high"] for c in cells])
        fit = fits[(spec, quantity)]
        label = (
            spec
            if fit["slope"] is None
            else (f"{spec}: slope {fit['slope']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]")
        )
        err = np.vstack([mean - np.maximum(lo, mean * 1e-3), hi - mean])
        line = ax.errorbar(n, mean, yerr=err, fmt="o", markersize=3.5, capsize=2, label=label)
        if fit["slope"] is not None:
            ax.plot(
                n,
                np.exp(fit["intercept"]) * n ** fit["slope"],
                "-",
                color=line[0].get_color(),
                linewidth=1.0,
                alpha=0.8,
            )
    ax.plot(n, np.sqrt(n), "--", color="0.45", linewidth=1.0, label="sqrt(N)")
    ax.plot(n, 2 * np.sqrt(n), ":", color="0.45", linewidth=1.2, label="2 sqrt(N)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (sequence length)")
    ax.set_ylabel(_LABELS.get(quantity, quantity))
    std = float(np.mean(mc["score_std"])) if mc.get("score_std") else float("nan")
    ax.set_title(
        f"{_LABELS.get(quantity, quantity)} vs N ({mc['samples']} draws per N, score std {std:.2g})",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, out_png, dpi)


def plot_softmax_bounds(bounds: Mapping[str, Any], out_png: str | os.PathLike, dpi: int = 100) -> Path:
    """Largest ratio to each bound of Theorem 4.1, per matrix family, against N."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), sharex=True)
    markers = "os^vD<>xP*"
    for i, fam in enumerate(bounds["families"]):
        pts = sorted((r["n"], r["max_fro_ratio"], r["max_jac_ratio"]) for r in bounds["rows"] if r["family"] == fam)
        ns = [p[0] for p in pts]
        for ax, k in zip(axes, (1, 2), strict=True):
            ax.plot(
                ns,
                [p[k] for p in pts],
                marker=markers[i % len(markers)],
                markersize=4,
                linewidth=0.8,
                label=fam,
            )
    for ax, title in zip(axes, ("||softmax(S)||_F / sqrt(N)", "||d softmax(S)/dS||_F / (2 sqrt(N))"), strict=True):
        ax.axhline(1.0, color="crimson", linewidth=1.2, label="bound (ratio 1)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axhline(0.25, color="0.4", linestyle="--", linewidth=1.0, label="sqrt(N)/2 (ratio 1/4)")
    lo = min(r["max_fro_ratio"] for r in bounds["rows"] if r["max_fro_ratio"] > 0)
    lo = min(lo, min(r["max_jac_ratio"] for r in bounds["rows"] if r["max_jac_ratio"] > 0))
    for ax in axes:
        ax.set_ylim(max(lo / 2, 1e-4), 2.0)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Theorem 4.1: largest ratio to the bound ({bounds['matrices_checked']} matrices)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi)
