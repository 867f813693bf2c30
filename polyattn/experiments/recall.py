"""Multi-query associative recall (MQAR): causal attention activations against sequence length.

    from polyattn.experiments.recall import recall
    results = recall("runs/recall")   # causal_lm on generated MQAR; 6 activations x 3 seeds x lengths
    print(results["table_text"])

For each sequence length L, one :func:`polyattn.experiments.compare.compare` runs into
``OUT/T<L>/`` (its own table with mean ± std, 95% intervals and paired tests against softmax,
norm curves, report.md, every run directory) on the base config with ``data.seq_len=L``. ``OUT``
then holds the overview: ``results.json``, ``report.md`` and ``recall.png`` (accuracy against L).
The base config is written to ``OUT/base_config.yaml`` (unless ``config`` names a file), so
every length's report names a command that reruns it.

Accuracy is over the answers only (the value after each queried key), as in Zoology.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..core.activations import Activation
from ..data.registry import build_dataset
from ..training.config import load_config, read_config_file
from ..training.grid import (
    GridError,
    Overrides,
    activation_axis,
    axis_values,
    merge_layers,
    override_items,
    override_layer,
    override_words,
    parse_seeds,
    relative_path,
    reserve_keys,
    write_results,
)
from ..utils import RunDirLock, atomic_write_text
from ..utils.machine import machine_info, machine_line
from ..utils.record import run_record, runs_digest
from .compare import compare
from .plots import pyplot, save_figure

__all__ = ["DEFAULT_RECALL_ACTIVATIONS", "DEFAULT_SEQ_LENS", "RECALL_CONFIG", "format_recall_table", "recall"]

# The comparison: softmax, the polynomial family at the theory's scale, and two peers
# (ReLU attention divided by N, sigmoid attention with its -log N bias).
DEFAULT_RECALL_ACTIVATIONS: tuple[str, ...] = (
    "softmax",
    "x^3/sqrt(N)",
    "x^2/sqrt(N)",
    "x/sqrt(N)",
    "relu/N",
    "sigmoid-log(N)",
)
DEFAULT_SEQ_LENS: tuple[int, ...] = (32, 64)

# The CPU preset, a config file of the package (the settings of configs/recall/mqar_cpu.yaml; a test
# keeps them equal): 36 runs at lengths 32 and 64 in under 10 minutes on 2 cores (docs/causal.md);
# configs/recall/zoology.yaml is the full-size setting for a GPU.
RECALL_CONFIG = Path(__file__).with_name("configs") / "recall.yaml"


def _length(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 8:
        raise GridError(f"--seq-lens: sequence lengths must be integers >= 8, got {n!r}")
    return n


def _check_lengths(seq_lens: Iterable[int]) -> list[int]:
    need = "at least one length is needed, e.g. --seq-lens 64,128"
    return axis_values(seq_lens, "--seq-lens", _length, "{value} is listed twice", need)


def recall(
    out_dir: str | os.PathLike = "runs/recall",
    activations: Iterable[str | Activation] | str = DEFAULT_RECALL_ACTIVATIONS,
    seeds: int | str | Sequence[int] = 3,
    seq_lens: Iterable[int] = DEFAULT_SEQ_LENS,
    epochs: int | None = None,
    config: str | os.PathLike | None = None,
    overrides: Overrides = (),
    resume: bool = False,
    progress: bool = True,
    norm_every: int = 10,
    jobs: int | str | None = 1,
) -> dict:
    """Train every (length, activation, seed) on MQAR; returns the overview also written to ``out_dir``.

    ``config``: a base config file (default :data:`RECALL_CONFIG`); ``epochs``, ``overrides``,
    ``resume``, ``norm_every`` and ``jobs`` as in :func:`.compare.compare`. Bad arguments raise
    before any training.
    """
    t0 = time.perf_counter()
    acts = activation_axis(activations)
    seed_list = parse_seeds(seeds)
    lengths = _check_lengths(seq_lens)
    user = override_layer(overrides)
    reserve_keys(user, {"data.seq_len": "--seq-lens"}, "length by recall")
    out = Path(out_dir)
    with RunDirLock(out, "polyattn recall", command="recall"):
        base = config
        if base is None:
            base = out / "base_config.yaml"
            atomic_write_text(yaml.safe_dump(read_config_file(RECALL_CONFIG), sort_keys=False), base)
        for n in lengths:  # every length's config and data (e.g. too many pairs for T) before any training
            cfg = load_config(str(base), merge_layers({"data.seq_len": n}, user))
            build_dataset(cfg["data"], cfg["train"]["seed"])
        per_length = {}
        for n in lengths:
            per_length[n] = compare(
                out / f"T{n}",
                activations=acts,
                seeds=seed_list,
                epochs=epochs,
                config=base,
                overrides=[{"data.seq_len": n}, *override_items(overrides)],
                resume=resume,
                progress=progress,
                norm_every=norm_every,
                jobs=jobs,
                desc=f"recall T={n}",
            )
        specs = [a.spec for a in acts]
        results = _overview(out, per_length, specs, seed_list, str(base), override_words(overrides))
        return write_results(results, out, recall_markdown, t0)


def _overview(out: Path, per_length: dict[int, dict], specs: list[str], seeds: list[int], base: str,
              overrides: list[str]) -> dict:  # fmt: skip
    first = next(iter(per_length.values()))
    table = [
        {
            "activation": act,
            "cells": {
                str(n): next(row for row in res["table"] if row["activation"] == act) for n, res in per_length.items()
            },
        }
        for act in specs
    ]
    results: dict[str, Any] = {
        "kind": "recall",
        "out_dir": str(out),
        "settings": {
            "activations": specs,
            "seeds": seeds,
            "seq_lens": list(per_length),
            "config": base,
            "overrides": overrides,
            "epochs": first["settings"]["epochs"],
            "model": first["settings"]["model"],
            "amp": first["settings"].get("amp"),
            "amp_setting": first["settings"].get("amp_setting"),
            # what defines the task (not where files live or how they load)
            "data": {
                k: v for k, v in first["base_config"]["data"].items() if k not in ("seq_len", "root", "num_workers")
            },  # fmt: skip
        },
        "metric": first["metric"],
        "table": table,
        "lengths": {str(n): relative_path(out / f"T{n}", out) for n in per_length},
        "machine": machine_info(),
        "machine_line": machine_line("cpu"),
        # Threads, precision and backends are the runs' own (every length's), from their summaries.
        "record": run_record(
            precision=first["settings"].get("amp"),
            **{"threads": None, **runs_digest([r for res in per_length.values() for r in res["runs"]])},
        ),
    }
    results["table_text"] = format_recall_table(table, list(per_length))
    results["figure"] = plot_recall(results, out / "recall.png").name
    return results


def _cell(c: dict) -> str:
    if c["mean"] is None:
        return "div" if c["diverged"] else "-"
    spread = "" if c["std"] is None else f" ± {100 * c['std']:.1f}"
    return f"{100 * c['mean']:.1f}{spread}" + ("*" if c["diverged"] else "")


def format_recall_table(table: Sequence[dict], lengths: Sequence[int]) -> str:
    """Fixed-width text: one row per activation, one column per sequence length (answer accuracy %)."""
    header = ["activation", *(f"T={n}" for n in lengths)]
    lines = [header] + [[r["activation"], *(_cell(r["cells"][str(n)]) for n in lengths)] for r in table]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
            for line in lines]  # fmt: skip
    text.insert(1, "  ".join("-" * w for w in widths))
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
        f"![accuracy against sequence length]({results['figure']})",
        "",
        "Per length (table with 95% intervals and paired tests against softmax, norm curves, every run):",
        "",
        *(f"- T={n}: [{path}/report.md]({path}/report.md)" for n, path in results["lengths"].items()),
        "",
    ]
    return "\n".join(lines)
