"""Every experiment's report: one module each (:mod:`.compare`, :mod:`.sweep`, :mod:`.recall`, :mod:`.theory`,
:mod:`.bench`) over the shared pieces of :mod:`.common` (tables, notes, the reproduce command, figure saving).

The comparison's and the sweep's entry points stay importable from here, where they lived before the reports
had one module each.
"""

from __future__ import annotations

from .compare import compare_markdown, format_table, write_attention_figures, write_compare_figures
from .sweep import plot_scale_sweep, sweep_markdown

__all__ = [
    "compare_markdown",
    "format_table",
    "plot_scale_sweep",
    "sweep_markdown",
    "write_attention_figures",
    "write_compare_figures",
]
