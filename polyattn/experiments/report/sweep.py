"""The figure and report.md of ``polyattn sweep``: accuracy against the scale k of x^p/k per sequence length,
the paper's Figure 1."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ...utils.format import fmt_pct
from . import common as kit

__all__ = ["plot_scale_sweep", "sweep_command", "sweep_markdown"]


def plot_scale_sweep(results: Mapping, out_png: str | os.PathLike) -> Path:
    """Top-1 against k (the activation is x^P/k, log axis), one line per sequence length.

    Error bars: one std over seeds; a k where every seed diverged is an x on
    the bottom edge; dashed lines: the softmax run of the same length.
    """
    plt = kit.pyplot()
    s = results["settings"]
    base = kit.power_base(s["power"])
    table = results["table"]
    values = [
        100 * c["mean"]
        for r in table
        for c in [*r["cells"].values(), r["softmax"] or {"mean": None}]
        if c["mean"] is not None
    ]
    lo = kit.axis_floor(values, 10)
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    for i, r in enumerate(table):
        color = f"C{i}"
        ks = [float(k) for k in r["cells"]]
        means = [None if c["mean"] is None else 100 * c["mean"] for c in r["cells"].values()]
        errs = [0.0 if c["std"] is None else 100 * c["std"] for c in r["cells"].values()]
        pts = [(k, m, e) for k, m, e in zip(ks, means, errs, strict=True) if m is not None]
        label = f"{r['tokens']} patches (patch {r['patch_size']})"
        if pts:
            xs, ms, es = zip(*pts, strict=True)
            ax.errorbar(xs, ms, yerr=es, color=color, marker="o", markersize=4, capsize=3, label=label)
        else:
            ax.plot([], [], color=color, marker="o", label=label)
        dead = [k for k, c in zip(ks, r["cells"].values(), strict=True) if c["mean"] is None and c["diverged"]]
        if dead:
            ax.plot(dead, [lo] * len(dead), "x", color=color, markersize=9, markeredgewidth=2, clip_on=False)
        if r["softmax"] and r["softmax"]["mean"] is not None:
            ax.axhline(100 * r["softmax"]["mean"], color=color, linestyle="--", linewidth=1.0, alpha=0.8)
    ks_all = [float(k) for k in s["scales"]]
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks_all, [f"1/{k:g}" for k in ks_all])
    ax.minorticks_off()
    kit.accuracy_axis(ax, lo)
    ax.set_xlabel(f"scale of {base} (activation {base}/k, log axis)")
    extra = "; dashed: softmax" if s.get("baseline") else ""
    ax.set_title(
        f"{s['model']} on {s['dataset']}, {s['epochs']} epochs, {len(s['seeds'])} seed(s){extra}; x: diverged",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return kit.save_figure(fig, out_png)


def _sweep_intro(results: Mapping) -> list[str]:
    s = results["settings"]
    base = kit.power_base(s["power"])
    return [
        f"# Scale sweep of {base}: {s['model']} on {s['dataset']} (the paper's Figure 1 at CPU scale)",
        "",
        f"Activation {base}/k for k in {', '.join(f'{k:g}' for k in s['scales'])}"
        + (" and softmax as reference" if s["baseline"] else "")
        + f", at patch sizes {', '.join(map(str, s['patch_sizes']))} on {s['image_size'][0]}x{s['image_size'][1]} "
        f"images; {len(s['seeds'])} seed(s), {s['epochs']} epochs per run; base config: {s['config']}"
        + kit.overrides_note(s)
        + kit.machine_note(results.get("machine", {}))
        + "."
        + kit.precision_note(s)
        + (f" Total time {results['time_s'] / 60:.1f} min." if results.get("time_s") else ""),
        "",
        "The paper (Figure 1, ViT-Tiny on Tiny-ImageNet, 8 to 256 tokens) reports that the scale needed for good "
        "accuracy shrinks (k grows) with the sequence length, as the theory's 1/sqrt(N) predicts. Here the "
        "sequence length is set by the patch size.",
        "",
    ]


def _sweep_cell(c: Mapping | None) -> str:
    if c is None:
        return "-"
    if c["mean"] is None:
        return "div" if c["diverged"] else "-"
    std = "" if c["std"] is None else f" ± {100 * c['std']:.1f}"
    return f"{100 * c['mean']:.1f}{std}{'`*`' if c['diverged'] else ''}"


def _sweep_table(results: Mapping) -> list[str]:
    base = kit.power_base(results["settings"]["power"])
    ks = [f"{k:g}" for k in results["settings"]["scales"]]
    lines = [
        f"Top-1 (%): {results['metric']}; mean over the seeds that did not diverge. *div*: every seed diverged; "
        "`*`: some did. *best k*: the k with the highest mean.",
        "",
    ]
    header = ["patches (+ class token)", *(f"{base}/{k}" if k != "1" else base for k in ks), "softmax", "best k"]
    rows = [
        [
            f"{r['tokens']} (patch {r['patch_size']})",
            *(_sweep_cell(r["cells"][k]) for k in ks),
            _sweep_cell(r["softmax"]),
            r["best_k"] or "-",
        ]
        for r in results["table"]
    ]
    return lines + kit.md_table(header, rows)


def _sweep_runs_section(results: Mapping) -> list[str]:
    header = ["run", "activation", "patches", "seed", "top-1", "diverged at step", "time", "status"]
    rows = [
        [
            f"[{r['name']}]({r['run_dir']})",
            r["activation"],
            r["tokens"],
            r["seed"],
            fmt_pct(r["top1"]),
            r["diverged_step"] or "-",
            kit.fmt_seconds(r.get("time_s")),
            r["status"],
        ]
        for r in results["runs"]
    ]
    return ["## Runs", "", *kit.md_table(header, rows)]


def sweep_command(settings: Mapping, out: str | os.PathLike) -> str:
    """The ``polyattn sweep`` command line that makes these results."""
    cmd = ["polyattn", "sweep", "--out", str(out), "--scales", ",".join(f"{k:g}" for k in settings["scales"])]
    cmd += ["--patch-sizes", ",".join(map(str, settings["patch_sizes"])), "--power", str(settings["power"])]
    cmd += ["--seeds", kit.seeds_arg(settings["seeds"]), "--epochs", str(settings["epochs"])]
    if not settings["baseline"]:
        cmd.append("--no-baseline")
    cmd += kit.source_args(settings)
    return kit.command_line(cmd)


def sweep_markdown(results: Mapping, out: str | os.PathLike) -> str:
    """report.md of a scale sweep: settings, the table, the plot, every run, the command."""
    return "\n".join(
        [
            *_sweep_intro(results),
            *_sweep_table(results),
            "",
            *kit.md_figure("accuracy against the scale", results["figures"]["sweep"]),
            *_sweep_runs_section(results),
            *kit.reproduce_section(sweep_command(results["settings"], out)),
        ]
    )
