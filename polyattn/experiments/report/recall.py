"""The overview of ``polyattn recall``: the accuracy table over sequence lengths (text), its figure and report.md."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .common import md_figure, pyplot, save_figure, text_table

__all__ = ["format_recall_table", "plot_recall", "recall_markdown"]


def _cell(c: dict) -> str:
    if c["mean"] is None:
        return "div" if c["diverged"] else "-"
    spread = "" if c["std"] is None else f" ± {100 * c['std']:.1f}"
    return f"{100 * c['mean']:.1f}{spread}" + ("*" if c["diverged"] else "")


def format_recall_table(table: Sequence[dict], lengths: Sequence[int]) -> str:
    """Fixed-width text: one row per activation, one column per sequence length (answer accuracy %)."""
    header = ["activation", *(f"T={n}" for n in lengths)]
    rows = [[r["activation"], *(_cell(r["cells"][str(n)]) for n in lengths)] for r in table]
    text = text_table(header, rows, right=range(1, len(header)))
    text.append(
        "MQAR answer accuracy %, mean ± std over seeds ('div': every seed diverged, '*': some did); "
        "per-length tables with intervals and paired tests in T<L>/report.md"
    )
    return "\n".join(text)


def plot_recall(results: dict, out_png: str | os.PathLike) -> Path:
    """Answer accuracy against sequence length, one line per activation (mean ± std over seeds)."""
    plt = pyplot()
    lengths = results["settings"]["seq_lens"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, row in enumerate(results["table"]):
        pts = [(n, row["cells"][str(n)]) for n in lengths if row["cells"][str(n)]["mean"] is not None]
        if not pts:
            continue
        xs = [n for n, _ in pts]
        ys = [100 * c["mean"] for _, c in pts]
        err = [100 * (c["std"] or 0.0) for _, c in pts]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=f"C{i}", label=row["activation"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(0, 100)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("MQAR answer accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    s = results["settings"]
    ax.set_title(f"{s['model']}, {s['data'].get('num_kv_pairs')} key-value pairs, {len(s['seeds'])} seed(s)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    return save_figure(fig, out_png)


def recall_markdown(results: dict) -> str:
    """report.md of the overview: settings, the table, the figure, a link to each length's own report."""
    s = results["settings"]
    lines = [
        "# Multi-query associative recall (MQAR)",
        "",
        f"{len(s['activations'])} activations x {len(s['seeds'])} seed(s) x lengths "
        f"{', '.join(map(str, s['seq_lens']))}; model {s['model']}, {s['epochs']} epochs; data "
        + ", ".join(f"{k}={v}" for k, v in s["data"].items())
        + f"; base config {s['config']}"
        + (f" with --set {' '.join(s['overrides'])}" if s["overrides"] else "")
        + ".",
        f"Machine: {results['machine_line']}. Time: {results.get('time_s', 0) / 60:.1f} min."
        + (f" Precision: train.amp={s['amp_setting']} -> {s['amp']}." if s.get("amp") else ""),
        "",
        "```",
        results["table_text"],
        "```",
        "",
        *md_figure("accuracy against sequence length", results["figure"]),
        "Per length (table with 95% intervals and paired tests against softmax, norm curves, every run):",
        "",
        *(f"- T={n}: [{path}/report.md]({path}/report.md)" for n, path in results["lengths"].items()),
        "",
    ]
    return "\n".join(lines)
