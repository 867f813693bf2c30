"""PINN figures and tables: fields and loss curves of one run, a comparison of finished runs."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from ...utils import atomic_write_bytes, atomic_write_text
from ..pdes import PDE, get_pde
from ..plots import pyplot, save_figure

__all__ = ["compare_runs", "label", "plot_fields", "plot_loss", "summary_row"]


def label(cfg: dict) -> str:
    """The run's model in words, for titles."""
    if cfg["model"]["name"] == "mlp":
        return "MLP PINN"
    return f"PINNsFormer, attention {cfg['model']['activation']}"


def plot_fields(ev: dict, pde: PDE, title: str, path: Path, dpi: int = 100) -> None:
    """Exact, predicted and |error| fields side by side (t vertical, x horizontal)."""
    plt = pyplot()
    extent = [pde.x_range[0], pde.x_range[1], pde.t_range[0], pde.t_range[1]]
    err = np.abs(ev["pred"] - ev["exact"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.1))
    fig.subplots_adjust(left=0.05, right=0.97, bottom=0.16, top=0.84, wspace=0.3)
    vmin, vmax = float(ev["exact"].min()), float(ev["exact"].max())
    panels = (
        ("exact u(x, t)", ev["exact"], dict(vmin=vmin, vmax=vmax, cmap="RdBu_r")),
        ("predicted", ev["pred"], dict(vmin=vmin, vmax=vmax, cmap="RdBu_r")),
        (f"|error|  rMAE {ev['rMAE']:.3f}  rRMSE {ev['rRMSE']:.3f}", err, dict(cmap="magma")),
    )
    for ax, (name, field_, kw) in zip(axes, panels, strict=True):
        im = ax.imshow(field_, origin="lower", extent=extent, aspect="auto", **kw)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("x")
        ax.set_ylabel("t")
        fig.colorbar(im, ax=ax)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi)


def plot_loss(history: list[dict], title: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.15, top=0.9)
    steps = [h["step"] for h in history]
    for key in ("loss", "residual", "initial", "boundary"):
        vals = [max(h[key], 1e-30) for h in history]
        ax.semilogy(steps, vals, label=key, lw=1.2 if key == "loss" else 0.9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (before the step)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _read_run(run_dir: Path) -> tuple[dict, dict | None]:
    mpath = run_dir / "metrics.json"
    if not mpath.is_file():
        raise ValueError(f"{str(run_dir)!r} has no metrics.json: is it a finished `polyattn pinn` run directory?")
    metrics = json.loads(mpath.read_text(encoding="utf-8"))
    ppath = run_dir / "prediction.npz"
    pred = dict(np.load(ppath)) if ppath.is_file() else None
    return metrics, pred


def _variant(metrics: dict) -> str:
    return "MLP PINN" if metrics["model"] == "mlp" else metrics["activation"]


def compare_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike, dpi: int = 72) -> str:
    """A Markdown table of finished runs, plus one small PNG per PDE of the runs' predictions.

    Writes ``out_dir/comparison.md`` and ``out_dir/<pde>.png`` (exact solution,
    then each run's prediction and |error|); returns the table.
    """
    out = Path(out_dir)
    runs = [(Path(d), *_read_run(Path(d))) for d in run_dirs]
    table, groups = _comparison_table(runs)
    atomic_write_text(table, out / "comparison.md")
    # The figure shows the first run of each (PDE, model, attention).
    runs = [
        next((d, m, p) for d, m, p in runs if (m["pde"], m["model"], m["activation"] or "-") == key) for key in groups
    ]
    for pde_name in dict.fromkeys(m["pde"] for _, m, _ in runs):
        group = [(m, p) for _, m, p in runs if m["pde"] == pde_name and p is not None]
        if group:
            _prediction_figure(pde_name, group, out / f"{pde_name}.png", dpi)
    return table


def _comparison_table(runs: list[tuple]) -> tuple[str, dict[tuple, list[dict]]]:
    """The per-run table (and, with repeated runs, the aggregate one), and the runs grouped by variant."""
    lines = [
        "| PDE | model | attention | seed | rMAE | rRMSE | final loss | steps (evals) | train time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for _, m, _ in runs:
        att = m["activation"] or "-"
        groups.setdefault((m["pde"], m["model"], att), []).append(m)
        if m["diverged"]:
            lines.append(f"| {m['pde']} | {m['model']} | {att} | {m['seed']} | diverged | | | {m['steps']} | |")
            continue
        lines.append(
            f"| {m['pde']} | {m['model']} | {att} | {m['seed']} | {m['rMAE']:.3f} | {m['rRMSE']:.3f} | "
            f"{m['final_loss']:.2e} | {m['steps']} ({m['func_evals']}) | {m['train_time_s']:.0f} s |"
        )
    table = "\n".join(lines) + "\n"
    if any(len(g) > 1 for g in groups.values()):
        agg = [
            "",
            "| PDE | model | attention | runs | rMAE mean (min - max) | rRMSE mean (min - max) |",
            "|---|---|---|---|---|---|",
        ]
        for (pde_name, model_name, att), group in groups.items():
            ok = [m for m in group if not m["diverged"]]
            cells = []
            for key in ("rMAE", "rRMSE"):
                vals = [m[key] for m in ok]
                cells.append(f"{np.mean(vals):.3f} ({min(vals):.3f} - {max(vals):.3f})" if vals else "-")
            diverged = len(group) - len(ok)
            runs_cell = f"{len(group)}" + (f" ({diverged} diverged)" if diverged else "")
            agg.append(f"| {pde_name} | {model_name} | {att} | {runs_cell} | {cells[0]} | {cells[1]} |")
        table += "\n".join(agg) + "\n"
    return table, groups


def _prediction_figure(pde_name: str, group: list[tuple[dict, dict]], path: Path, dpi: int) -> None:
    """Exact solution, then each run's prediction over its |error|, on shared colour scales."""
    from PIL import Image

    plt = pyplot()
    pde = get_pde(pde_name, group[0][0]["pde_params"])
    extent = [pde.x_range[0], pde.x_range[1], pde.t_range[0], pde.t_range[1]]
    exact = group[0][1]["exact"]
    n = len(group)
    fig, axes = plt.subplots(2, n + 1, figsize=(2.1 * (n + 1), 4.0), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.99, bottom=0.02, top=0.82, wspace=0.08, hspace=0.08)
    lim = float(np.abs(exact).max())
    err_max = max(float(np.abs(p["pred"] - p["exact"]).max()) for _, p in group)
    axes[0, 0].imshow(exact, origin="lower", extent=extent, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
    axes[0, 0].set_title("exact", fontsize=8)
    axes[1, 0].axis("off")
    axes[1, 0].text(0.0, 0.5, "top: prediction\nbottom: |error|\n(shared scales)", fontsize=7, va="center")
    for j, (m, p) in enumerate(group, start=1):
        axes[0, j].imshow(p["pred"], origin="lower", extent=extent, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[0, j].set_title(f"{_variant(m)}\nrMAE {m['rMAE']:.3f}", fontsize=7)
        axes[1, j].imshow(
            np.abs(p["pred"] - p["exact"]),
            origin="lower",
            extent=extent,
            aspect="auto",
            cmap="magma",
            vmin=0,
            vmax=err_max,
        )
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{pde_name} (x horizontal, t vertical)", fontsize=9, y=0.985)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    # A 128-colour palette keeps the documentation figures small.
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(colors=128)
    small = io.BytesIO()
    img.save(small, format="PNG", optimize=True)
    atomic_write_bytes(small.getvalue(), path)


def summary_row(metrics: dict) -> str:
    """One line for the terminal."""
    act = metrics["activation"] or "-"
    if metrics["diverged"]:
        return f"{metrics['pde']:<11} {metrics['model']:<12} {act:<13} diverged: {metrics['stop_reason']}"
    return (
        f"{metrics['pde']:<11} {metrics['model']:<12} {act:<13} rMAE {metrics['rMAE']:.4f}  "
        f"rRMSE {metrics['rRMSE']:.4f}  loss {metrics['final_loss']:.3e}  "
        f"{metrics['steps']} steps / {metrics['func_evals']} evals  {metrics['train_time_s']:.0f} s"
    )
