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

from ..data.registry import build_dataset
from ..training.config import load_config
from ..utils import RunDirLock, atomic_write_json, atomic_write_text
from ..utils.machine import machine_info, machine_line
from ..utils.record import run_record, runs_digest
from .compare import CompareError, compare, json_safe, parse_activations, parse_seeds, relative_path
from .report.recall import format_recall_table, plot_recall, recall_markdown

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

# The CPU preset (same settings as configs/recall/mqar_cpu.yaml; a test keeps them equal): 36 runs at
# lengths 32 and 64 in under 10 minutes on 2 cores (docs/causal.md); configs/recall/zoology.yaml is the
# full-size setting for a GPU.
RECALL_CONFIG: dict[str, Any] = {
    "description": "MQAR (multi-query associative recall), CPU preset: 2-layer 1-head causal_lm, 4 key-value pairs",
    "model": {
        "name": "causal_lm",
        "activation": "softmax",
        "overrides": {"dim": 64, "depth": 2, "num_heads": 1, "mlp_dim": 128},
    },
    "data": {"name": "mqar", "vocab_size": 64, "num_kv_pairs": 4, "num_train": 6000, "num_val": 500, "seed": 0},
    "train": {
        "epochs": 8,
        "batch_size": 32,
        # A constant lr after warmup: softmax finds the recall circuit after ~1,000 steps at T = 64 and
        # a decaying lr delays that past the end of a CPU-sized run.
        "lr": 1.0e-3,
        "min_lr": 1.0e-3,
        "weight_decay": 0.1,
        "warmup_epochs": 0.5,
        "grad_clip": 1.0,
        "seed": 0,
        "log_every": 25,
        "num_threads": 1,
        "amp": "auto",
        "select": "last",
    },
    "diagnostics": {"every": 0},
}


def _check_lengths(seq_lens: Iterable[int]) -> list[int]:
    out: list[int] = []
    for n in seq_lens:
        if isinstance(n, bool) or not isinstance(n, int) or n < 8:
            raise CompareError(f"--seq-lens: sequence lengths must be integers >= 8, got {n!r}")
        if n in out:
            raise CompareError(f"--seq-lens: {n} is listed twice")
        out.append(n)
    if not out:
        raise CompareError("--seq-lens: at least one length is needed, e.g. --seq-lens 64,128")
    return out


def recall(
    out_dir: str | os.PathLike = "runs/recall",
    activations: Iterable[str] | str = DEFAULT_RECALL_ACTIVATIONS,
    seeds: int | str | Sequence[int] = 3,
    seq_lens: Iterable[int] = DEFAULT_SEQ_LENS,
    epochs: int | None = None,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
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
    specs = parse_activations(activations)
    seed_list = parse_seeds(seeds)
    lengths = _check_lengths(seq_lens)
    for text in overrides:
        if text.partition("=")[0].strip() == "data.seq_len":
            raise CompareError(f"--set {text}: data.seq_len is set per length by recall; use --seq-lens")
    out = Path(out_dir)
    with RunDirLock(out, "polyattn recall", command="recall"):
        base = config
        if base is None:
            base = out / "base_config.yaml"
            atomic_write_text(yaml.safe_dump(RECALL_CONFIG, sort_keys=False), base)
        for n in lengths:  # every length's config and data (e.g. too many pairs for T) before any training
            cfg = load_config(str(base), [f"data.seq_len={n}", *overrides])
            build_dataset(cfg["data"], cfg["train"]["seed"])
        per_length = {}
        for n in lengths:
            per_length[n] = compare(
                out / f"T{n}",
                activations=specs,
                seeds=seed_list,
                epochs=epochs,
                config=base,
                overrides=[f"data.seq_len={n}", *overrides],
                resume=resume,
                progress=progress,
                norm_every=norm_every,
                jobs=jobs,
                desc=f"recall T={n}",
            )
        results = _overview(out, per_length, specs, seed_list, str(base), list(overrides))
        results["time_s"] = time.perf_counter() - t0
        atomic_write_text(recall_markdown(results), out / "report.md")
        atomic_write_json(json_safe(results), out / "results.json")
        return results


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
