"""The cost model behind ``backend="auto"``.

Each backend's fwd+bwd time is estimated from the sizes of the call: matrix
product FLOPs at a measured rate, elementwise passes over the score tiles at a
measured rate (in cache for tiled backends, from memory for the materialised
one), a fixed cost per PyTorch operation (tiles, chunks), and the number of
symmetric features for the linear form. The constants for CPU were measured on
the project's 2-core AVX-512 machine (docs/benchmarks.md); the GPU ones are
order-of-magnitude guesses (no GPU was available to measure them), which only
matter for ranking triton against linear there.

The model is for ranking, not for predicting wall time: ``explain_backend``
prints every estimate so a choice can be checked against ``polyattn bench``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..activations import Activation
from .chunked import default_block_sizes, keeps_scores, tile_group
from .common import Layout
from .linear import feature_count

__all__ = ["CallInfo", "Estimate", "MachineRates", "estimate", "rates_for"]


@dataclass(frozen=True)
class CallInfo:
    """What the cost model and the support checks need to know about one attention call."""

    device: torch.device
    dtype: torch.dtype
    bh: int
    nq: int
    nk: int
    d: int
    dv: int
    activation: Activation
    mask: str | None  # None, "padding" (one flag per key) or "full" (per query and key)
    has_bias: bool
    causal: bool
    dropout_p: float

    @property
    def entries(self) -> int:
        """Score entries computed: BH * Nq * Nk (about half of it under causal)."""
        e = self.bh * self.nq * self.nk
        if self.causal:
            n = min(self.nq, self.nk)
            e = self.bh * (n * (n + 1) // 2 + max(self.nq - self.nk, 0) * self.nk)
        return max(e, 1)


@dataclass(frozen=True)
class MachineRates:
    matmul_flops: float  # dense fp32 matrix product, FLOP/s
    sdpa_flops: float  # SDPA softmax fwd+bwd, counted as 12 N^2 d FLOP, per second
    sdpa_fixed: float  # SDPA seconds per fwd+bwd call (small-N overhead)
    ew_cache: float  # elementwise elements/s on a cache-resident tile
    ew_memory: float  # elementwise elements/s on a tensor streamed from memory (with allocation)
    op_overhead: float  # seconds per PyTorch operation
    memory_budget: float  # bytes the materialised reference may hold before it is ruled out


_CPU = MachineRates(
    matmul_flops=140e9, sdpa_flops=100e9, sdpa_fixed=5e-4, ew_cache=2.5e9, ew_memory=0.6e9,
    op_overhead=12e-6, memory_budget=2 * 2**30,
)
# Unmeasured: the order of magnitude of an H100 in bf16/fp32 and a kernel launch.
_GPU = MachineRates(
    matmul_flops=300e12, sdpa_flops=250e12, sdpa_fixed=1e-4, ew_cache=2e12, ew_memory=1e12,
    op_overhead=8e-6, memory_budget=8 * 2**30,
)


def rates_for(device: torch.device) -> MachineRates:
    return _GPU if device.type == "cuda" else _CPU


@dataclass(frozen=True)
class Estimate:
    seconds: float
    note: str


def _avg_dim(info: CallInfo) -> float:
    return (info.d + info.dv) / 2


def _reference(info: CallInfo, m: MachineRates) -> Estimate:
    e = info.bh * info.nq * info.nk  # the materialised path computes every entry, causal or not
    # S, phi(S) and the mask-selected copies are held for backward: about 4 (Nq, Nk) matrices.
    held = 4 * e * 4
    if held > m.memory_budget:
        return Estimate(math.inf, f"needs ~{held / 2**30:.1f} GiB of (Nq, Nk) matrices")
    passes = 10 + (4 if info.mask or info.causal else 0) + (2 if info.activation.is_dynamic else 0)
    rate = m.ew_cache if held <= 8 * 2**20 else m.ew_memory
    t = 12 * e * _avg_dim(info) / m.matmul_flops + passes * e / rate + 30 * m.op_overhead
    return Estimate(t, f"materialises {info.bh}x{info.nq}x{info.nk} scores")


def _chunked(info: CallInfo, m: MachineRates) -> Estimate:
    layout = Layout(info.bh, info.nq, info.nk, info.d, info.dv)
    bq, bk = default_block_sizes(layout, info.device)
    e = info.entries
    tiles = math.ceil(info.nq / bq) * math.ceil(info.nk / bk)
    if info.causal:
        tiles = max(1, tiles // 2 + math.ceil(info.nq / bq))
    groups = math.ceil(info.bh / tile_group(layout, bq, bk, 4, info.device))
    # Seven products per tile; six when short sequences let forward keep S for backward.
    kept = not info.activation.is_softmax and keeps_scores(layout)
    products = 12 if kept else 14
    passes = 4 if info.activation.is_polynomial else 9
    if info.activation.is_softmax:
        passes = 10
    if info.mask or info.causal:
        passes += 1
    t = (
        products * e * _avg_dim(info) / m.matmul_flops
        + passes * e / m.ew_cache
        + (tiles * groups * 16 + 20) * m.op_overhead
    )
    return Estimate(t, f"{tiles * groups} tiles of {bq}x{bk}" + (", scores kept" if kept else ""))


def _linear(info: CallInfo, m: MachineRates) -> Estimate:
    p = info.activation.power
    f = feature_count(info.d, p)
    n = info.nq + info.nk
    flops = 2 * info.bh * f * info.dv * 3 * n
    # gathers and products building the monomials (forward and twice in backward) and their VJP
    ew = info.bh * n * f * ((p + 1) ** 2 + 2 * p) if p > 1 else 0
    chunks = math.ceil(n / 512)
    if info.causal:
        c = 256
        flops = flops * 5 / 3 + 14 * info.bh * info.nq * c * _avg_dim(info) / 2
        ew = ew * 5 / 3
        chunks = math.ceil(n / c) * 2
    t = flops / m.matmul_flops + ew / m.ew_cache + (chunks * (12 + 4 * p) + 20) * m.op_overhead
    # f may be symbolic under torch.compile(dynamic=True), which has no "," format; nobody reads notes there.
    return Estimate(t, f"{f} features" if torch.compiler.is_compiling() else f"{f:,} features")


def _sdpa(info: CallInfo, m: MachineRates) -> Estimate:
    t = 12 * info.entries * _avg_dim(info) / m.sdpa_flops + m.sdpa_fixed + 4 * m.op_overhead
    if info.causal and (info.mask or info.has_bias):
        t += info.nq * info.nk * 2 / m.ew_memory  # the merged causal mask
    return Estimate(t, "FlashAttention-style fused softmax")


def _triton(info: CallInfo, m: MachineRates) -> Estimate:
    # Two dots forward, seven backward (S is recomputed in both backward kernels).
    t = 9 * info.entries * _avg_dim(info) * 2 / m.matmul_flops + 3 * m.op_overhead
    return Estimate(t, "fused kernel (GPU rate unmeasured)")


_MODELS = {
    "reference": _reference,
    "chunked": _chunked,
    "linear": _linear,
    "sdpa": _sdpa,
    "triton": _triton,
}


def estimate(name: str, info: CallInfo) -> Estimate:
    """Estimated fwd+bwd seconds of backend ``name`` for this call."""
    return _MODELS[name](info, rates_for(info.device))
