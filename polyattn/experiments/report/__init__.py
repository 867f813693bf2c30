"""Every experiment's report: one module each (:mod:`.compare`, :mod:`.sweep`, :mod:`.recall`, :mod:`.theory`,
:mod:`.bench`) over the shared pieces of :mod:`.common` (tables, notes, the reproduce command, figure saving).

The names below are the comparison's and the sweep's report entry points, importable from here as before the
reports had one module each.
"""

from __future__ import annotations

from .compare import (
    compare_markdown,
    fmt_pct,
    format_table,
    heatmap_activations,
    norm_summary,
    plot_accuracy,
    plot_attention_heatmaps,
    plot_cls_attention,
    reproduce_command,
    write_attention_figures,
    write_compare_figures,
)
from .sweep import plot_scale_sweep, sweep_command, sweep_markdown

__all__ = [
    "compare_markdown",
    "fmt_pct",
    "format_table",
    "heatmap_activations",
    "norm_summary",
    "plot_accuracy",
    "plot_attention_heatmaps",
    "plot_cls_attention",
    "plot_scale_sweep",
    "reproduce_command",
    "sweep_command",
    "sweep_markdown",
    "write_attention_figures",
    "write_compare_figures",
]
