"""The pieces every experiment's report is made of: tables (markdown and fixed-width text), the notes on
settings, machine, code and precision, the reproduce-command block, and figure saving.

Each experiment's report module (:mod:`.compare`, :mod:`.sweep`, :mod:`.recall`, :mod:`.theory`,
:mod:`.bench`) builds its text from these, so that one fact (the machine, the code's commit, the
precision) reads the same in every report.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from ...training.precision import PRECISION_WORDS
from ..plots import pyplot, save_figure

__all__ = [
    "accuracy_axis",
    "axis_floor",
    "command_line",
    "fmt_seconds",
    "machine_note",
    "md_figure",
    "md_table",
    "overrides_note",
    "power_base",
    "precision_note",
    "pyplot",
    "record_note",
    "reproduce_section",
    "save_figure",
    "seeds_arg",
    "source_args",
    "text_table",
]


# --------------------------------------------------------------------------- #
# Tables
# --------------------------------------------------------------------------- #
def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table: the header, the ``---`` line, one line per row (cells as given, str() of others)."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> list[str]:
    """A fixed-width text table: the header, a dashed line, the rows; two spaces between columns.

    Columns are as wide as their widest cell, left-aligned except those whose index is in ``right``.
    """
    lines = [list(header), *(list(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return text


def md_figure(alt: str, path: str) -> list[str]:
    """A markdown image line and the blank line after it."""
    return [f"![{alt}]({path})", ""]


# --------------------------------------------------------------------------- #
# Notes on settings, machine, code, precision
# --------------------------------------------------------------------------- #
def fmt_seconds(t: float | None) -> str:
    """A run's time as "12 s" ("-" when the run has none)."""
    return "-" if t is None else f"{t:.0f} s"


def overrides_note(settings: Mapping) -> str:
    return f"; overrides: `{' '.join(settings['overrides'])}`" if settings["overrides"] else ""


def machine_note(machine: Mapping) -> str:
    """ ". Machine: 2 CPU core(s) (AVX-512 BF16), no GPU" from a results file's machine_info."""
    gpu = f", GPU {machine['cuda']}" if machine.get("cuda") else ", no GPU"
    cpu = f" ({machine['cpu_class']})" if machine.get("cpu_class") else ""
    return f". Machine: {machine.get('cpu_count', '?')} CPU core(s){cpu}{gpu}"


def record_note(record: Mapping | None) -> str:
    """ " Code: polyattn 0.1.0 (commit 1a2b3c4d5e6f). Threads per run: 1. Backends chosen: reference." from a
    results file's run record ("" for results written before records)."""
    if not record:
        return ""
    code = f"polyattn {record.get('polyattn') or '?'}"
    if record.get("commit"):
        code += f" (commit {record['commit'][:12]}{', uncommitted changes' if record.get('dirty') else ''})"
    text = f" Code: {code}."
    if record.get("threads_per_run"):
        text += f" Threads per run: {', '.join(map(str, record['threads_per_run']))}."
    if record.get("backends"):
        text += f" Backends chosen: {', '.join(record['backends'])}."
    return text


def precision_note(settings: Mapping) -> str:
    """ " Precision: fp32 (train.amp=auto)." for reports of grids that record it ("" for older results)."""
    amp = settings.get("amp")
    if amp is None:
        return ""
    asked = settings.get("amp_setting")
    return f" Precision: {PRECISION_WORDS.get(amp, amp)}" + (f" (train.amp={asked})" if asked else "") + "."


def power_base(p: int) -> str:
    """The polynomial of power ``p`` as an activation spec writes it: "x" or "x^3"."""
    return "x" if p == 1 else f"x^{p}"


# --------------------------------------------------------------------------- #
# The command that reruns an experiment
# --------------------------------------------------------------------------- #
def source_args(settings: Mapping) -> list[str]:
    """The command-line arguments naming the base config (or dataset and model) and the overrides."""
    if not str(settings["config"]).startswith("built-in"):
        parts = ["--config", str(settings["config"])]
    else:
        parts = ["--dataset", settings["dataset"], "--model", settings["model"]]
    if settings["overrides"]:
        parts += ["--set", *settings["overrides"]]
    return parts


def seeds_arg(seeds: Sequence[int]) -> str:
    # A trailing comma makes one seed a list of seeds ("5,"), not a count of seeds ("5").
    return ",".join(str(s) for s in seeds) + ("," if len(seeds) == 1 else "")


def command_line(parts: Sequence[str]) -> str:
    """A shell command line from its words, each quoted where the shell needs it."""
    return " ".join(shlex.quote(p) for p in parts)


def reproduce_section(command: str) -> list[str]:
    return ["", "## Reproduce", "", "```bash", command, "```", ""]


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #
def axis_floor(values: Sequence[float], step: int) -> float:
    """The bottom of an accuracy axis (%): a multiple of ``step`` at least 5 points below the lowest value, or 0."""
    return 0.0 if not values else max(0.0, step * math.floor((min(values) - 5) / step))


def accuracy_axis(ax: Any, lo: float) -> None:
    """A top-1 axis from ``lo`` to 100%, its label saying where it starts when not at 0."""
    ax.set_ylim(lo, 100.0)
    ax.set_ylabel("top-1 accuracy (%)" + (f", axis from {lo:.0f}%" if lo > 0 else ""))
