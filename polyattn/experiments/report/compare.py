"""Figures and report.md for ``polyattn compare``.

Figures, all PNG under the comparison's output directory:

* ``accuracy.png``: top-1 per activation, bars at the mean, error bars one
  standard deviation over seeds, each seed a dot.
* ``norms.png``: ||A||_F and ||dA/dS||_F per layer during training (the
  paper's Figures 2-3), drawn by :func:`polyattn.experiments.plots.plot_norm_curves`.
* ``attention_layer<L>.png``: attention matrices of a scaled polynomial and
  softmax, every head, averaged over a fixed batch of validation images (the
  paper's Figures 6-7: an early and the last layer).
* ``cls_attention.png``: class-token attention over the input images, last
  layer (the paper's Figure 9).

The attention matrices come from :class:`polyattn.core.AttentionMapRecorder`,
so the figures work for any model whose attention follows the protocol of
:mod:`polyattn.core.module`: polyattn's ViT, and timm models after
:func:`polyattn.patch` (the class-token figure needs a class token over a
patch grid).

matplotlib is imported inside the functions with the Agg backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ...core.activations import get_activation
from ...core.diagnostics import AttentionMapRecorder
from ...core.module import attention_modules
from ...utils import read_jsonl
from ...utils.format import fmt_pct
from ..plots import plot_norm_curves
from .common import (
    accuracy_axis,
    axis_floor,
    command_line,
    fmt_seconds,
    machine_note,
    md_figure,
    md_table,
    overrides_note,
    precision_note,
    pyplot,
    record_note,
    reproduce_section,
    save_figure,
    seeds_arg,
    source_args,
    text_table,
)

__all__ = [
    "compare_markdown",
    "fmt_pct",
    "format_table",
    "heatmap_activations",
    "norm_summary",
    "plot_accuracy",
    "plot_attention_heatmaps",
    "plot_cls_attention",
    "reproduce_command",
    "write_attention_figures",
    "write_compare_figures",
]

HEATMAP_BATCH = 128  # the paper averages its heat maps over a batch of 128 images
CLS_IMAGES = 4


def plot_accuracy(table: Sequence[Mapping], out_png: str | os.PathLike, title: str = "") -> Path:
    """Bars at the mean top-1 per activation, error bars +-1 std, one dot per finished seed.

    The y axis starts a little below the lowest value (say so in the label), so
    differences of a point stay visible; activations whose every seed diverged
    get no bar and the word "diverged".
    """
    plt = pyplot()
    labels = [r["activation"] for r in table]
    values = [100 * v for r in table for v in r["per_seed"].values() if v is not None]
    lo = axis_floor(values, 5)
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 2.0, 4.0))
    for i, r in enumerate(table):
        seeds = [100 * v for v in r["per_seed"].values() if v is not None]
        if r["mean"] is not None:
            err = 0.0 if r["std"] is None else 100 * r["std"]
            ax.bar(i, 100 * r["mean"] - lo, bottom=lo, color=f"C{i}", alpha=0.75, width=0.6)
            ax.errorbar(i, 100 * r["mean"], yerr=err, color="black", capsize=5, linewidth=1.2)
            offsets = [0.18 * (j - (len(seeds) - 1) / 2) / max(1, len(seeds) - 1) for j in range(len(seeds))]
            ax.plot([i + o for o in offsets], seeds, "o", color="black", markersize=3.5, alpha=0.8)
        if r["diverged"]:
            y = lo + 1.0 if r["mean"] is None else 100 * r["mean"] + (100 * (r["std"] or 0.0)) + 0.5
            text = "diverged" if r["mean"] is None else f"{r['diverged']}/{r['seeds']} diverged"
            ax.text(i, min(y, 99.5), text, ha="center", va="bottom", fontsize=8, color="crimson")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    accuracy_axis(ax, lo)
    ax.grid(True, axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)


# --------------------------------------------------------------------------- #
# Attention matrices
# --------------------------------------------------------------------------- #
def heatmap_activations(activations: Sequence[str]) -> list[str]:
    """The pair the heat maps contrast: the first scaled polynomial (else the first non-softmax) and softmax.

    Ordered as in the paper's Figures 6-7: polynomial left (top), softmax right (bottom).
    """
    acts = {a: get_activation(a) for a in activations}
    scaled = [a for a, act in acts.items() if act.is_polynomial and act.divisor is not None]
    others = [a for a in activations if a != "softmax"]
    first = scaled[0] if scaled else (others[0] if others else None)
    return [a for a in (first, "softmax" if "softmax" in acts else None) if a is not None]


def _signed_imshow(fig: Any, ax: Any, m: Any, **kw: Any) -> None:
    """Diverging colours centred at 0 when the matrix has negative entries (polynomials), else viridis
    over the matrix's own range (softmax weights differ by little after averaging over a batch)."""
    if float(m.min()) < 0:
        lim = float(abs(m).max()) or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, **kw)
    else:
        im = ax.imshow(m, cmap="viridis", **kw)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)


def plot_attention_heatmaps(
    maps: Mapping[str, torch.Tensor],
    layer: int,
    out_png: str | os.PathLike,
    batch: int | None = None,
    class_token: bool = True,
) -> Path:
    """One row per activation, one column per head: the (T, T) attention matrix of ``layer`` (0-based).

    ``maps``: label -> (heads, T, T) tensors (already averaged over the batch);
    ``class_token``: whether token 0 is a class token (said in the title).
    """
    plt = pyplot()
    heads = max(int(m.shape[0]) for m in maps.values())
    fig, axes = plt.subplots(len(maps), heads, figsize=(2.5 * heads + 0.4, 2.45 * len(maps) + 0.5), squeeze=False)
    for i, (label, a) in enumerate(maps.items()):
        for h in range(heads):
            ax = axes[i][h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= a.shape[0]:
                ax.axis("off")
                continue
            _signed_imshow(fig, ax, a[h].float().numpy(), interpolation="nearest")
            ax.set_title(f"{label}, head {h + 1}", fontsize=8)
        axes[i][0].set_ylabel("query token", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("key token", fontsize=8)
    over = f", mean over {batch} validation images" if batch else ""
    cls = " (token 0: class token)" if class_token else ""
    fig.suptitle(f"attention matrix A, layer {layer + 1}{over}{cls}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)


def _display_image(x: torch.Tensor) -> tuple[Any, str | None]:
    """(H, W) or (H, W, 3) array in [0, 1] for imshow, and its colour map."""
    x = x.float()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    if x.shape[0] == 1:
        return x[0].numpy(), "gray_r"
    return x[:3].permute(1, 2, 0).numpy(), None


def plot_cls_attention(
    images: torch.Tensor,
    labels: Sequence[int],
    maps: Mapping[str, torch.Tensor],
    layer: int,
    head: int,
    out_png: str | os.PathLike,
) -> Path:
    """Rows: images; columns: the input, then per activation the class token's attention over the patches.

    ``images``: (k, C, H, W); ``maps``: label -> (k, grid_h, grid_w) weights of
    one head, drawn on the image with nearest-neighbour upsampling (as the
    paper's Figure 9) and the digit's outline on top.
    """
    plt = pyplot()
    k = images.shape[0]
    h, w = images.shape[-2:]
    cols = 1 + len(maps)
    fig, axes = plt.subplots(k, cols, figsize=(2.2 * cols + 0.4, 2.1 * k + 0.5), squeeze=False)
    for r in range(k):
        img, cmap = _display_image(images[r])
        axes[r][0].imshow(img, cmap=cmap, interpolation="nearest")
        axes[r][0].set_title(f"input (label {labels[r]})", fontsize=8)
        outline = images[r].float().mean(0).numpy()
        for c, (label, m) in enumerate(maps.items(), start=1):
            ax = axes[r][c]
            up = torch.nn.functional.interpolate(m[r][None, None].float(), size=(h, w), mode="nearest")[0, 0]
            _signed_imshow(fig, ax, up.numpy(), interpolation="nearest")
            ax.contour(outline, levels=[float(outline.mean())], colors="black", linewidths=0.6, linestyles="solid")
            ax.set_title(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"class-token attention over the image, layer {layer + 1}, head {head + 1}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)


def _val_batch(cfg: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` validation examples of a run's data (a fixed batch: the split depends on data.seed only)."""
    from ...data.registry import build_dataset

    val = build_dataset(cfg["data"], cfg["train"]["seed"]).val
    items = [val[i] for i in range(min(n, len(val)))]
    if not items or not isinstance(items[0][0], torch.Tensor) or not items[0][0].is_floating_point():
        raise TypeError("attention figures need image tensors as model inputs")
    if torch.as_tensor(items[0][1]).dim() != 0:
        raise TypeError("attention figures need one class label per example, not per-token targets")
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def _distinct_labels(y: torch.Tensor, k: int) -> list[int]:
    """Indices of the first example of each of the ``k`` smallest labels (else the first k examples)."""
    first: dict[int, int] = {}
    for i, label in enumerate(y.tolist()):
        first.setdefault(label, i)
    if len(first) < k:
        return list(range(min(k, len(y))))
    return [first[label] for label in sorted(first)[:k]]


def _load_models(results: dict, out: Path, activations: Sequence[str], notes: list[str]) -> dict[str, Any]:
    """label -> (model, cfg) of the first seed's run, for runs with a checkpoint and polyattn attention modules."""
    from ...training import load_run

    seed = results["settings"]["seeds"][0]
    by_act = {r["activation"]: r for r in results["runs"] if r["seed"] == seed}
    models = {}
    for act in activations:
        rec = by_act.get(act)
        if rec is None:
            continue
        try:
            model, cfg = load_run(out / rec["run_dir"])
        except FileNotFoundError:
            notes.append(f"{act} (seed {seed}) has no checkpoint (it diverged in its first epoch): no attention maps")
            continue
        if not attention_modules(model):
            notes.append(
                f"model {cfg['model']['name']} has no polyattn attention module: the attention figures need "
                "PolyAttention layers or third-party attention patched by polyattn"
            )
            return {}
        if rec["diverged"]:
            notes.append(f"{act} (seed {seed}) diverged: its maps use the weights of its last finished epoch")
        models[act] = (model, cfg)
    return models


def norm_summary(rows: Sequence[Mapping]) -> dict:
    """Head- and layer-averaged ``||A||_F`` and ``||dA/dS||_F`` at the first and last recorded step, and the
    largest step average, from one run's NormRecorder rows."""
    by_step: dict[int, list[Mapping]] = {}
    for r in rows:
        by_step.setdefault(int(r["step"]), []).append(r)

    def mean(step: int, key: str) -> float:
        vals = [float(r[key]) for r in by_step[step]]
        return sum(vals) / len(vals)

    steps = sorted(by_step)
    first, last = steps[0], steps[-1]
    return {
        "first_step": first,
        "last_step": last,
        "fro_first": mean(first, "fro"),
        "jac_first": mean(first, "jac_fro"),
        "fro_last": mean(last, "fro"),
        "jac_last": mean(last, "jac_fro"),
        "fro_max": max(mean(s, "fro") for s in steps),
        "jac_max": max(mean(s, "jac_fro") for s in steps),
    }


def _class_token_grid(model: nn.Module, tokens: int) -> tuple[int, tuple[int, int]] | None:
    """(prefix tokens, patch grid) when token 0 of a ``tokens``-long attention is a class token over the patches.

    Read from the attributes polyattn's ViT and timm's ViT share: ``cls_token``,
    ``patch_embed.grid_size`` and (timm, counting register tokens) ``num_prefix_tokens``.
    """
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if getattr(model, "cls_token", None) is None or grid is None:
        return None
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    gh, gw = int(grid[0]), int(grid[1])
    return (prefix, (gh, gw)) if tokens == prefix + gh * gw else None


def write_attention_figures(
    models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, out: str | os.PathLike
) -> tuple[dict[str, str], int, list[str]]:
    """Attention heat maps and class-token maps of trained models into ``out``.

    ``models``: activation -> model with polyattn attention modules (any
    protocol model: polyattn's ViT, a timm model after :func:`polyattn.patch`),
    used in their current mode; ``x``, ``y``: a batch of images and labels.
    The maps are recorded by :class:`polyattn.core.AttentionMapRecorder` in one
    forward per model: ``attention_layer<L>.png`` for an early and the last
    attention layer (the paper's layers 2 and 12 of 12), and
    ``cls_attention.png`` when token 0 is a class token over a patch grid.
    Returns ({name: file name}, the number of keys the early layer attends, notes).
    """
    out = Path(out)
    figures: dict[str, str] = {}
    notes: list[str] = []
    first = next(iter(models.values()))
    last = len(attention_modules(first)) - 1
    layers = sorted({min(1, last), last})
    maps: dict[str, dict[int, torch.Tensor]] = {}
    for act, model in models.items():
        with AttentionMapRecorder(model, layers=layers) as rec, torch.no_grad():
            model(x)
        maps[act] = {layer: rec.get(layer) for layer in layers}
    tokens = int(next(iter(maps.values()))[layers[0]].shape[-1])

    pair = [a for a in heatmap_activations(list(models)) if a in models]
    for layer in layers:
        cls_grid = _class_token_grid(first, int(maps[pair[0]][layer].shape[-1]))
        name = f"attention_layer{layer + 1}.png"
        figures[f"attention_layer{layer + 1}"] = plot_attention_heatmaps(
            {a: maps[a][layer].mean(0) for a in pair}, layer, out / name, len(x), class_token=cls_grid is not None
        ).name

    cls_grid = _class_token_grid(first, int(next(iter(maps.values()))[last].shape[-1]))
    if cls_grid is None:
        notes.append(f"{type(first).__name__} has no class token over a patch grid: no class-token attention figure")
        return figures, tokens, notes
    prefix, (gh, gw) = cls_grid
    idx = _distinct_labels(y, CLS_IMAGES)
    head = 0
    cls_maps = {a: m[last][idx, head, 0, prefix:].reshape(len(idx), gh, gw) for a, m in maps.items()}
    figures["cls_attention"] = plot_cls_attention(
        x[idx], [int(y[i]) for i in idx], cls_maps, last, head, out / "cls_attention.png"
    ).name
    return figures, tokens, notes


def _norm_figure(results: dict, out: Path, notes: list[str]) -> dict[str, str]:
    """norms.png from the first seed's NormRecorder rows, and ``results["norm_summary"]``."""
    seed = results["settings"]["seeds"][0]
    norm_rows = {}
    for rec in results["runs"]:
        if rec["seed"] != seed:
            continue
        rows = [
            r
            for r in read_jsonl(out / rec["run_dir"] / "metrics.jsonl")
            if r.get("kind") == "norms" and math.isfinite(r["fro"]) and math.isfinite(r["jac_fro"])
        ]
        if rows:
            norm_rows[rec["activation"]] = rows
    if not norm_rows:
        notes.append("no norm rows recorded (diagnostics.every = 0): no norm curves")
        return {}
    results["norm_summary"] = {act: norm_summary(rows) for act, rows in norm_rows.items()}
    title = f"attention norms during training (seed {seed}, mean over heads)"
    png = plot_norm_curves(norm_rows, out / "norms.png", title=title, tokens=results.get("tokens"))
    return {"norms": png.name}


def write_compare_figures(results: dict, out: str | os.PathLike, progress: bool = False) -> tuple[dict, list[str]]:
    """Draw the comparison's figures into ``out``; returns ({name: file name}, notes on what was skipped).

    Also adds to ``results``: ``norm_summary`` (per activation, see :func:`norm_summary`) and
    ``tokens`` (the sequence length the attention saw), when the runs allow them.
    """
    out = Path(out)
    notes: list[str] = []
    settings = results["settings"]
    title = f"{settings['model']} on {settings['dataset']}, {len(settings['seeds'])} seed(s)"
    figures = {"accuracy": plot_accuracy(results["table"], out / "accuracy.png", title).name}
    # The attention figures first: they measure the sequence length, which the norm figure's bounds need.
    figures.update(_attention_figures(results, out, notes))
    figures.update(_norm_figure(results, out, notes))
    return figures, notes


def _attention_figures(results: dict, out: Path, notes: list[str]) -> dict[str, str]:
    loaded = _load_models(results, out, results["settings"]["activations"], notes)
    if not loaded:
        return {}
    cfg = next(iter(loaded.values()))[1]
    try:
        x, y = _val_batch(cfg, HEATMAP_BATCH)
    except TypeError as e:
        notes.append(f"no attention figures: {e}")
        return {}
    figures, results["tokens"], attention_notes = write_attention_figures(
        {act: model for act, (model, _) in loaded.items()}, x, y, out
    )
    notes += attention_notes
    return figures


# --------------------------------------------------------------------------- #
# report.md
# --------------------------------------------------------------------------- #
def _mean_std(row: Mapping) -> str:
    if row["mean"] is None:
        return "- (all diverged)" if row["diverged"] else "-"
    if row["std"] is None:
        return f"{100 * row['mean']:.2f}%"
    return f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f}%"


def _ci(r: Mapping) -> str:
    ci = r.get("ci95")
    return "-" if not ci else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _vs(r: Mapping, baseline: str) -> str:
    """The paired difference to the baseline in points: "+0.27 [-1.20, +1.74] p=0.62"."""
    if r["activation"] == baseline:
        return "(baseline)"
    vs = r.get("vs_baseline")
    if not vs:
        return "-"
    lo, hi = vs["ci95"]
    return f"{100 * vs['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] p={vs['p']:.2g}"


def _baseline(rows: Sequence[Mapping]) -> str:
    return next((r["vs_baseline"]["baseline"] for r in rows if r.get("vs_baseline")), "softmax")


STATS_NOTE = (
    "95% CI: Student-t interval of the mean over seeds; vs {b}: the difference to {b} in points over the "
    "seeds both finished (same seed = same initial weights and data order), its 95% t-interval and the "
    "paired t-test's two-sided p. With few seeds an interval is wide: a difference is real only where it "
    "excludes 0."
)


def _summary_header(baseline: str) -> list[str]:
    return ["activation", "top-1 (mean ± std)", "95% CI", "n", "diverged", f"vs {baseline} (paired)", "per seed"]


def _summary_cells(r: Mapping, baseline: str) -> list[str]:
    """A table row's cells but the last (per seed), as the text table and report.md both show them."""
    return [r["activation"], _mean_std(r), _ci(r), f"{r['n']}/{r['seeds']}", str(r["diverged"]), _vs(r, baseline)]


def format_table(rows: Sequence[dict], metric: str = "") -> str:
    """The comparison table as fixed-width text: activation, top-1 mean +- std and its 95% interval,
    seeds, diverged, the paired difference to softmax, per seed."""
    baseline = _baseline(rows)
    cells = [
        [
            *_summary_cells(r, baseline),
            "  ".join(f"s{s}:{'div' if v is None else f'{100 * v:.1f}'}" for s, v in r["per_seed"].items()),
        ]
        for r in rows
    ]
    text = text_table(_summary_header(baseline), cells, right=(1, 2, 3, 4))
    if metric:
        text.append(f"top-1: {metric}; n = seeds that finished without diverging (mean and std over those)")
        text.append(STATS_NOTE.format(b=baseline))
    return "\n".join(t.rstrip() for t in text)


def _times(results: Mapping) -> str:
    train_s = sum(r["time_s"] or 0.0 for r in results["runs"])
    text = f" Training time, summed over runs: {train_s / 60:.1f} min"
    if results.get("time_s"):
        text += f"; this invocation (reused runs cost nothing): {results['time_s'] / 60:.1f} min"
    return text + "."


def reproduce_command(settings: Mapping, out: str | os.PathLike) -> str:
    """The ``polyattn compare`` command line that makes these results."""
    parts = ["polyattn", "compare", "--out", str(out)]
    parts += ["--activations", ",".join(settings["activations"])]
    parts += ["--seeds", seeds_arg(settings["seeds"])]
    parts += ["--epochs", str(settings["epochs"]), *source_args(settings)]
    return command_line(parts)


def _compare_intro(results: Mapping) -> list[str]:
    s = results["settings"]
    n_params = next((r["num_params"] for r in results["runs"] if r.get("num_params")), None)
    tokens = results.get("tokens")
    return [
        f"# Attention activations compared: {s['model']} on {s['dataset']}",
        "",
        f"{len(s['activations'])} activations x {len(s['seeds'])} seed(s) "
        f"(train.seed {', '.join(map(str, s['seeds']))}), "
        f"{s['epochs']} epochs each, base config: {s['config']}" + overrides_note(s) + ".",
        f"Model: {s['model']}"
        + (f", {n_params:,} parameters" if n_params else "")
        + (f", {tokens} tokens per image (class token included)" if tokens else "")
        + machine_note(results.get("machine", {}))
        + f", torch {results.get('machine', {}).get('torch', '?')}."
        + precision_note(s)
        + record_note(results.get("record"))
        + _times(results),
        "",
    ]


def _results_section(results: Mapping) -> list[str]:
    lines = [
        "## Results",
        "",
        f"Top-1: {results['metric']}. Mean and standard deviation (sample, over seeds) of the runs that finished; "
        "a run whose loss or gradient became non-finite counts under *diverged* and not in the mean. "
        + STATS_NOTE.format(b=_baseline(results["table"])),
        "",
    ]
    baseline = _baseline(results["table"])
    rows = [
        [
            *_summary_cells(r, baseline),
            ", ".join(f"s{k}: {'diverged' if v is None else f'{100 * v:.1f}'}" for k, v in r["per_seed"].items()),
        ]
        for r in results["table"]
    ]
    lines += [*md_table(_summary_header(baseline), rows), ""]
    figs = results.get("figures", {})
    if "accuracy" in figs:
        lines += md_figure("top-1 per activation", figs["accuracy"])
    return lines


def _norms_section(results: Mapping) -> list[str]:
    figs = results.get("figures", {})
    if "norms" not in figs:
        return []
    s = results["settings"]
    tokens = results.get("tokens")
    lines = [
        "## Attention norms during training",
        "",
        f"‖A‖_F (top) and the Frobenius norm of its Jacobian, ‖dA/dS‖_F (bottom), per layer, mean over heads and "
        f"over the batch, recorded every {s['norm_every']} steps of seed {s['seeds'][0]} (the paper's "
        "Figures 2-3). Theorem 4.1 bounds softmax's by sqrt(N) and 2 sqrt(N)"
        + (f" (N = {tokens}: {math.sqrt(tokens):.2f} and {2 * math.sqrt(tokens):.2f})" if tokens else "")
        + "; the paper finds scaled polynomials closer to softmax than unscaled ones.",
        "",
        *md_figure("attention norms", figs["norms"]),
    ]
    if results.get("norm_summary"):
        header = ["activation", "‖A‖_F first step", "last step", "largest"]
        header += ["‖dA/dS‖_F first step", "last step", "largest"]
        keys = ("fro_first", "fro_last", "fro_max", "jac_first", "jac_last", "jac_max")
        rows = [[act, *(f"{n[k]:.3g}" for k in keys)] for act, n in results["norm_summary"].items()]
        lines += ["Mean over layers and heads (seed " + str(s["seeds"][0]) + "):", "", *md_table(header, rows), ""]
    return lines


def _attention_sections(results: Mapping) -> list[str]:
    """The heat maps (the paper's Figures 6-7) and the class-token maps (Figure 9), where drawn."""
    figs = results.get("figures", {})
    lines: list[str] = []
    heat = [k for k in figs if k.startswith("attention_layer")]
    if heat:
        which = " and ".join(k.replace("attention_", "").replace("layer", "layer ") for k in heat)
        lines += [
            "## Attention heat maps",
            "",
            f"The attention matrix A of every head in {which} (an early and the last layer, as the paper's "
            f"Figures 6-7), averaged over the first {HEATMAP_BATCH} validation images, after training, seed "
            f"{results['settings']['seeds'][0]}. Red/blue: positive/negative weights (polynomials may weigh tokens "
            "negatively); softmax rows are non-negative and sum to 1, drawn over their own range.",
            "",
        ]
        lines += [f"![{k.replace('_', ' ')}]({figs[k]})" for k in heat]
        lines.append("")
    if "cls_attention" in figs:
        lines += [
            "## Class-token attention over the image",
            "",
            "Row 0 of A without its class-token entry, reshaped to the patch grid and enlarged with nearest "
            "neighbours over the input (outline in black), last layer, head 1, as the paper's Figure 9.",
            "",
            *md_figure("class-token attention", figs["cls_attention"]),
        ]
    return lines


def _compare_runs_section(results: Mapping) -> list[str]:
    """Every run, then the notes (divergence messages and what the figures skipped)."""
    runs = results["runs"]
    header = ["run", "activation", "seed", "top-1", "best val", "diverged at step", "epochs", "steps", "time", "status"]
    rows = [
        [
            f"[{r['name']}]({r['run_dir']})",
            r["activation"],
            r["seed"],
            fmt_pct(r["top1"]),
            fmt_pct(r["best_val_acc"]),
            r["diverged_step"] or "-",
            r["epochs"],
            r["steps"],
            fmt_seconds(r.get("time_s")),
            r["status"],
        ]
        for r in runs
    ]
    lines = ["## Runs", "", *md_table(header, rows)]
    notes = [f"{r['name']}: {r['diverged_message']}" for r in runs if r["diverged"] and r.get("diverged_message")]
    notes += list(results.get("notes", []))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return lines


def compare_markdown(results: Mapping, out: str | os.PathLike | None = None) -> str:
    """report.md of a comparison: settings, the table, figures, every run, notes."""
    command = reproduce_command(results["settings"], out if out is not None else results.get("out_dir", "runs/compare"))
    lines = [
        *_compare_intro(results),
        *_results_section(results),
        *_norms_section(results),
        *_attention_sections(results),
        *_compare_runs_section(results),
        *reproduce_section(command),
        "Each run directory holds its resolved `config.yaml`, `metrics.jsonl` (epochs, steps, norms), "
        "`checkpoints/last.pt` and `summary.json`; `results.json` holds every number above.",
        "",
    ]
    return "\n".join(lines)
