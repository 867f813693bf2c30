"""The cost model behind ``backend="auto"``: machine rates, and each backend's own estimate.

A backend's fwd+bwd time is estimated by its module's ``cost(info, rates)``
from the sizes of the call and the backend's real tile and chunk sizes: its
matrix-product FLOPs, its elementwise passes (in cache or from memory) and
its PyTorch operations, each priced by one rate of :class:`MachineRates`
(:meth:`MachineRates.seconds`). The counts are read off each backend's code
and documented beside it; the rates are the small table below.

The model is for ranking, not for predicting wall time: ``explain_backend``
prints every estimate so a choice can be checked against ``polyattn bench``,
and :func:`calibrated` turns a bench ``results.json`` into per-backend
corrections (install them with :func:`set_rates`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from ..activations import get_activation
from . import chunked, linear, reference, sdpa, triton_kernels
from .chunked import default_block_sizes, keeps_scores, tile_group
from .common import CallInfo, Estimate, MachineRates
from .linear import feature_count

__all__ = [
    "MODULES",
    "CallInfo",
    "Estimate",
    "MachineRates",
    "calibrated",
    "default_block_sizes",
    "estimate",
    "feature_count",
    "keeps_scores",
    "rates_for",
    "set_rates",
    "tile_group",
]

# Every backend module (the protocol of .common), in the order explain_backend lists them.
MODULES = (reference, sdpa, chunked, linear, triton_kernels)
_BY_NAME = {m.NAME: m for m in MODULES}

# CPU: the project's 2-core AVX-512 machine, fp32 (docs/benchmarks.md). Matrix
# products run at 146 GFLOP/s inside the tiled backend (2048^3 alone: 146-169)
# and SDPA's flash kernel at the same rate; elementwise rates are what plain
# x^3 attention leaves after its products: 85 GFLOP/s at N = 1024 (cache
# resident, ~2.5e9 elements/s) and 43 GFLOP/s at N = 4096 (from memory,
# ~0.8e9 elements/s). GPU: unmeasured, the order of magnitude of an H100 and
# a kernel launch; it only ranks triton against the others there.
# One row per device type; the columns are MachineRates' fields, in order:
#   matmul_flops  sdpa_flops  sdpa_fixed  ew_cache  ew_memory  op_overhead  cache_bytes  memory_budget
_RATES = {
    "cpu": MachineRates(146e9, 117e9, 5e-4, 2.5e9, 0.8e9, 12e-6, 8 << 20, 2 << 30),
    "cuda": MachineRates(300e12, 250e12, 1e-4, 2e12, 1e12, 8e-6, 8 << 20, 8 << 30),
}
_BUILT_IN = dict(_RATES)


def rates_for(device: torch.device) -> MachineRates:
    """The rates auto uses for this device: CUDA's, or the CPU's for everything else."""
    return _RATES["cuda" if device.type == "cuda" else "cpu"]


def set_rates(device_type: str, rates: MachineRates | None) -> None:
    """Use ``rates`` for ``"cpu"`` or ``"cuda"`` from now on; None restores the built-in table."""
    if device_type not in _BUILT_IN:
        raise ValueError(f"device_type must be one of {sorted(_BUILT_IN)}, got {device_type!r}")
    _RATES[device_type] = rates if rates is not None else _BUILT_IN[device_type]


def estimate(name: str, info: CallInfo) -> Estimate:
    """Estimated fwd+bwd seconds of backend ``name`` for this call."""
    rates = rates_for(info.device)
    est = _BY_NAME[name].cost(info, rates)
    factor = rates.scale.get(name, 1.0)
    return est if factor == 1.0 else Estimate(est.seconds * factor, est.note)


def calibrated(results: Mapping[str, Any] | str | os.PathLike, base: MachineRates | None = None) -> MachineRates:
    """``base`` (the built-in rates of the bench's device) scaled per backend to a ``polyattn bench`` run.

    ``results`` is the bench's ``results.json`` (or its path). Each backend's
    factor is the median of measured / estimated fwd+bwd time over its timed
    cases, the estimates recomputed with ``base``; backends without timings
    keep factor 1. The bench's SDPA baseline counts as ``sdpa``.
    """
    if not isinstance(results, Mapping):
        with open(results) as f:
            results = json.load(f)
    cfg = results["config"]
    device = torch.device(cfg["device"])
    base = base or _BUILT_IN["cuda" if device.type == "cuda" else "cpu"]
    ratios: dict[str, list[float]] = {}
    for case in results["cases"]:
        name = "sdpa" if case["backend"] == "sdpa-softmax" else case["backend"]
        if name not in _BY_NAME or not case.get("time_s"):
            continue  # auto repeats the row of the backend it picked
        n, d = case["n"], case["d"]
        info = CallInfo(
            device=device,
            dtype=getattr(torch, cfg["dtype"]),
            bh=cfg["batch"] * cfg["heads"],
            nq=n,
            nk=n,
            d=d,
            dv=d,
            activation=get_activation(case["spec"]),
            mask=None,
            has_bias=False,
            causal=False,
            dropout_p=0.0,
        )
        predicted = _BY_NAME[name].cost(info, base).seconds
        if math.isfinite(predicted) and predicted > 0:
            ratios.setdefault(name, []).append(case["time_s"] / predicted)
    return replace(base, scale={name: statistics.median(r) for name, r in ratios.items()})
