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
    check_jobs,
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
from .compare import check_epochs, check_norm_every, compare
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
    # Every argument is checked before base_config.yaml is written: a refused call leaves nothing behind.
    check_epochs(epochs)
    check_norm_every(norm_every)
    check_jobs(jobs)
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
