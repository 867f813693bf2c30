"""Fused Triton kernels for elementwise activations (x^p above all), forward and backward.

One program owns a block of BLOCK_M query rows (forward, dQ) or BLOCK_N keys
(dK, dV) and loops over the other side in registers, so neither S nor A ever
reaches memory. Unlike softmax there is no running max, no rescaling and no
saved statistic: the forward kernel is two dots and phi per tile, and the
backward kernels recompute S. Key-padding masks are one flag per key; causal
tiles beyond the diagonal are never visited; the divisor (1/C, 1/sqrt(N), 1/N
with N the attendable keys of each row) is a per-row factor applied to the
output (forward) and to dO (backward).

Precision: S, phi(S) and every sum are fp32. With bf16 inputs on a GPU the
dots read bf16 tiles and accumulate in fp32, so phi(S) and dS are rounded to
bf16 before their products, as FlashAttention does with P; fp32 inputs use
IEEE fp32 dots (no TF32). fp16 inputs are computed as fp32 by the caller,
because x^3 of a score of 40 overflows fp16 (fp16 tensors passed to
:func:`run` directly are computed in fp32 and stored as fp16).

Layout: q, k, v, dO and every output are contiguous (BH, N, d) tensors, so
rows are d apart and heads N * d apart; one kernel serves the three passes
(forward, dQ, dK and dV), chosen by a compile-time PASS.

The forward and the backward are torch custom ops (``polyattn::triton_attention``
and ``polyattn::triton_attention_backward``) with fake implementations, so
``torch.compile(fullgraph=True)`` traces through the backend. On a GPU the
autotuner picks among launch configurations chosen per GPU generation, pass,
dtype and head dimension; ``polyattn kernels`` compiles every one of them for
sm_80 and sm_90 without a GPU and fails on spills or shared-memory overflow
(:func:`compile_variants` lists them for :mod:`.kernel_check`).

Testing: ``TRITON_INTERPRET=1`` (set before this module is imported) runs the
kernels on CPU tensors; the interpreter mis-computes bf16 dots, so there the
tiles are upcast to fp32 before every dot.
"""

from __future__ import annotations

import os

import torch

from .common import (
    Call,
    CallInfo,
    Estimate,
    MachineRates,
    backend_run,
    compute_dtype,
    keys_only_limits,
    refuse_double_backward,
)

try:  # triton is optional: CPU-only installs run every other backend
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = [
    "NAME",
    "compile_variants",
    "cost",
    "interpreter_active",
    "launch_configs",
    "run",
    "triton_attention",
    "triton_unavailable_reason",
    "unsupported",
]

NAME = "triton"
SUMMARY = "fused GPU kernel, elementwise activations"
NATIVE_CUDA_DTYPES = (torch.bfloat16,)

# Activation codes understood by the kernels.
_ACT_CODES = {"power": 0, "relu": 1, "elu": 2, "gelu": 3, "tanh": 4, "exp": 5, "sigmoid": 6}
_MAX_HEAD_DIM = 256
# The cost model: two products forward, seven backward (both backward passes
# recompute S: dK/dV four, dQ three); one kernel launch per pass.
_PRODUCTS = 9
_OPS = 3


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the triton backend cannot run on this device, or None."""
    if triton is None:
        return "triton is not installed (pip install 'polyattn[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_active():
        return None
    return f"the triton backend needs a CUDA device (got {device.type}; TRITON_INTERPRET=1 runs it on CPU, slowly)"


def unsupported(info: CallInfo) -> str | None:
    reason = triton_unavailable_reason(info.device)
    if reason is not None:
        return reason
    dtype = compute_dtype(info.dtype, info.device, NATIVE_CUDA_DTYPES)
    if dtype not in (torch.float32, torch.bfloat16):
        return f"the fused kernel computes float32 and bfloat16, not {dtype}"
    if info.activation.is_softmax:
        return "the fused kernel covers elementwise activations; softmax goes to SDPA"
    why_not = keys_only_limits(info, "the fused kernel")
    if why_not is None and max(info.d, info.dv) > _MAX_HEAD_DIM:
        why_not = f"head dimension {max(info.d, info.dv)} > {_MAX_HEAD_DIM}"
    return why_not


def cost(info: CallInfo, rates: MachineRates) -> Estimate:
    return Estimate(rates.seconds(flops=_PRODUCTS * info.product_flops, ops=_OPS), "fused kernel (GPU rate unmeasured)")


# GPU launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) by GPU generation (sm_80:
# Ampere's mma, also taken by sm_86/sm_89; sm_90: Hopper's wgmma), pass, input dtype and padded
# head dimension (the largest of BLOCK_D, BLOCK_DV). The autotuner times the one list that fits a
# call, once per (pass, NQ, NK, head dim, activation, causal, mask, dtype). Every entry compiles
# without spilling registers and within the target's shared memory (`polyattn kernels` checks it;
# docs/benchmarks.md has the table). The dK/dV pass holds k, v, dK and dV for its keys, so it takes
# fewer keys per program; fp32 inputs take IEEE fp32 dots, which run on CUDA cores and need far
# smaller tiles than bf16 tensor-core dots.
_PASSES = {0: "fwd", 1: "dq", 2: "dkdv"}
_Configs = tuple[tuple[int, int, int, int], ...]
_FP32_CONFIGS: dict[tuple[str, int], _Configs] = {  # the same lists for both generations
    ("fwd", 64): ((64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
    ("fwd", 128): ((32, 32, 4, 2), (16, 32, 4, 2)),
    ("dq", 64): ((32, 32, 4, 2),),
    ("dq", 128): ((16, 32, 4, 2),),
    ("dkdv", 64): ((32, 16, 4, 2),),
    ("dkdv", 128): ((16, 32, 8, 2), (16, 16, 4, 2)),
    ("fwd", 256): ((16, 16, 4, 2),),
    ("dq", 256): ((16, 16, 4, 2),),
    ("dkdv", 256): ((16, 16, 8, 2),),
}
_GPU_CONFIGS: dict[tuple[int, str, str, int], _Configs] = {
    (90, "fwd", "bf16", 64): ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)),
    (90, "fwd", "bf16", 128): ((64, 64, 4, 3), (64, 32, 4, 3)),
    (90, "dq", "bf16", 64): ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)),
    (90, "dq", "bf16", 128): ((64, 32, 8, 3), (32, 32, 4, 3)),
    (90, "dkdv", "bf16", 64): ((64, 64, 8, 3), (32, 128, 8, 3), (16, 64, 4, 3)),
    (90, "dkdv", "bf16", 128): ((32, 32, 8, 3),),
    (90, "fwd", "bf16", 256): ((64, 32, 8, 3),),
    (90, "dq", "bf16", 256): ((16, 32, 8, 3), (16, 16, 8, 3)),
    (90, "dkdv", "bf16", 256): ((16, 16, 8, 3), (16, 16, 4, 3)),
    (80, "fwd", "bf16", 64): ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)),
    (80, "fwd", "bf16", 128): ((128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)),
    (80, "dq", "bf16", 64): ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)),
    (80, "dq", "bf16", 128): ((32, 32, 4, 3), (16, 64, 4, 3), (32, 32, 8, 3)),
    (80, "dkdv", "bf16", 64): ((32, 32, 8, 3), (16, 64, 8, 3), (16, 32, 4, 3)),
    (80, "dkdv", "bf16", 128): ((16, 32, 8, 3), (32, 32, 8, 1)),
    (80, "fwd", "bf16", 256): ((64, 32, 8, 3), (32, 32, 4, 3)),
    (80, "dq", "bf16", 256): ((16, 32, 4, 3),),
    (80, "dkdv", "bf16", 256): ((16, 16, 8, 3),),
}
for _arch in (80, 90):
    for (_pass, _bucket_d), _configs in _FP32_CONFIGS.items():
        _GPU_CONFIGS[(_arch, _pass, "fp32", _bucket_d)] = _configs


def launch_configs(pass_: int, lowp: bool, block_d: int, arch: int) -> _Configs:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) choices of one pass at a padded head dimension
    on compute capability ``arch`` (80 for sm_80); Hopper and later take the sm_90 lists."""
    return pick_configs(_GPU_CONFIGS, pass_, lowp, block_d, arch)


def pick_configs(table: dict, pass_: int, lowp: bool, block_d: int, arch: int) -> _Configs:
    """The entry of a (generation, pass name, dtype, head-dim bucket) launch table that serves a call."""
    generation = 90 if arch >= 90 else 80
    return table[(generation, _PASSES[int(pass_)], "bf16" if lowp else "fp32", _bucket(block_d, table))]


def _bucket(block_d: int, table: dict | None = None) -> int:
    """The head-dimension key of a launch table (default _GPU_CONFIGS) that serves a padded head dimension."""
    dims = sorted({key[-1] for key in (table if table is not None else _GPU_CONFIGS)})
    return next((d for d in dims if d >= block_d), dims[-1])


# What `polyattn kernels` compiles: each activation code (x^p at p = 3), causal or not, the
# mask and row-factor paths on (the code without them is a subset).
_CHECK_HEAD_DIMS = (32, 64, 128, 256)  # 256: the largest the backend takes (_MAX_HEAD_DIM)
_CHECK_ACTIVATIONS = {"x^3": ("power", 3), "relu": ("relu", 1), "elu": ("elu", 1), "gelu": ("gelu", 1)}
_CHECK_ACTIVATIONS |= {"tanh": ("tanh", 1), "exp": ("exp", 1), "sigmoid": ("sigmoid", 1)}


def compile_variants(
    arch: int = 90,
    head_dims: tuple[int, ...] = _CHECK_HEAD_DIMS,
    dtypes: tuple[str, ...] = ("bf16", "fp32"),
    activations: tuple[str, ...] | None = None,
    causal: tuple[bool, ...] = (False, True),
    passes: tuple[int, ...] = (0, 1, 2),
    quick: bool = False,
) -> list:
    """Every kernel specialisation `polyattn kernels` compiles, with the launch configurations of each.

    ``quick``: only gelu (the most registers: erf and exp in the backward), causal, and each
    launch configuration of each pass and dtype once, at the largest head dimension whose list
    holds it (the one with the most registers and shared memory), so every configuration the
    autotuner may pick on ``arch`` is still compiled.

    The other arguments narrow the grid: ``head_dims`` (unpadded; each is padded to a power of
    two as a call's would be), ``dtypes`` ("bf16", "fp32"), ``activations`` (keys of
    _CHECK_ACTIVATIONS; None: all), ``causal`` and ``passes`` (0 forward, 1 dQ, 2 dK/dV).
    ``arch`` picks the launch lists of its generation (sm_86 and sm_89 take sm_80's).
    """

    def signature(ptr: str) -> dict[str, str]:
        sig = {name: ptr for name in ("Q", "K", "V", "DO", "OUT", "OUT2")}
        sig |= {"KMASK": "*i8", "R": "*fp32", "scale": "fp32", "r_scalar": "fp32"}
        return sig | {name: "i32" for name in ("stride_mb", "stride_rb", "stride_rn", "NQ", "NK", "D", "DV")}

    grid = (arch, head_dims, dtypes, activations, causal, passes, quick)
    return variant_grid(_attention_kernel, signature, {"HAS_MASK": True}, _GPU_CONFIGS, *grid)


def _largest_head_dim_only(variants: list) -> list:
    """Each launch configuration of each (pass, dtype) once, at the largest head dimension whose list
    holds it (a larger head dimension needs more registers and shared memory)."""
    from dataclasses import replace

    seen: set = set()
    kept: dict = {}
    for i, v in sorted(enumerate(variants), key=lambda iv: -iv[1].tags["head_dim"]):
        key = (v.tags["pass"], v.tags["dtype"])
        new = tuple(c for c in v.configs if (key, c) not in seen)
        seen |= {(key, c) for c in new}
        if new:
            kept[i] = replace(v, configs=new)
    return [kept[i] for i in sorted(kept)]


# Triton's on-disk cache keys a jit function by its source and its first line number: lines added
# above the kernels make every cached compile of them stale, which costs `polyattn kernels` minutes,
# so code that is not a kernel goes below them (variant_grid at the end of the module).
if triton is not None:

    @triton.jit
    def _phi(s, ACT: tl.constexpr, POWER: tl.constexpr):
        if ACT == 0:
            a = s
            for _ in tl.static_range(POWER - 1):
                a = a * s
        elif ACT == 1:
            a = tl.maximum(s, 0.0)
        elif ACT == 2:
            a = tl.where(s > 0, s, tl.exp(tl.minimum(s, 0.0)) - 1.0)
        elif ACT == 3:
            a = 0.5 * s * (1.0 + tl.math.erf(s * 0.7071067811865476))
        elif ACT == 4:
            a = 1.0 - 2.0 / (tl.exp(2.0 * s) + 1.0)
        elif ACT == 5:
            a = tl.exp(s)
        else:
            a = 1.0 / (1.0 + tl.exp(-s))
        return a

    @triton.jit
    def _dphi(s, ACT: tl.constexpr, POWER: tl.constexpr):
        if ACT == 0:
            g = tl.full(s.shape, POWER, tl.float32)
            for _ in tl.static_range(POWER - 1):
                g = g * s
        elif ACT == 1:
            g = tl.where(s > 0, 1.0, 0.0)
        elif ACT == 2:
            g = tl.where(s > 0, 1.0, tl.exp(tl.minimum(s, 0.0)))
        elif ACT == 3:
            cdf = 0.5 * (1.0 + tl.math.erf(s * 0.7071067811865476))
            pdf = tl.exp(-0.5 * s * s) * 0.3989422804014327
            g = cdf + s * pdf
        elif ACT == 4:
            t = 1.0 - 2.0 / (tl.exp(2.0 * s) + 1.0)
            g = 1.0 - t * t
        elif ACT == 5:
            g = tl.exp(s)
        else:
            e = 1.0 / (1.0 + tl.exp(-s))
            g = e * (1.0 - e)
        return g

    @triton.jit
    def _dot(a, b, LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr):
        # fp32 tiles: IEEE dots. bf16 tiles: tensor-core dots on a GPU, fp32 in the interpreter.
        if LOWP and NATIVE_LOWP:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")

    @triton.jit
    def _valid(offs_m, offs_n, NQ, NK, KMASK_row, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
        ok = (offs_m[:, None] < NQ) & (offs_n[None, :] < NK)
        if HAS_MASK:
            km = tl.load(KMASK_row + offs_n, mask=offs_n < NK, other=0)
            ok = ok & (km[None, :] != 0)
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        return ok

    @triton.jit
    def _valid_t(offs_m, offs_n, NQ, NK, KMASK_row, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
        """_valid transposed: (BLOCK_N keys, BLOCK_M queries)."""
        ok = (offs_n[:, None] < NK) & (offs_m[None, :] < NQ)
        if HAS_MASK:
            km = tl.load(KMASK_row + offs_n, mask=offs_n < NK, other=0)
            ok = ok & (km[:, None] != 0)
        if CAUSAL:
            ok = ok & (offs_n[:, None] <= offs_m[None, :])
        return ok

    @triton.jit
    def _row_factor(R, offs_m, NQ, stride_rn, r_scalar, HAS_R: tl.constexpr):
        if HAS_R:
            r = tl.load(R + offs_m * stride_rn, mask=offs_m < NQ, other=0.0)
        else:
            r = tl.full(offs_m.shape, r_scalar, tl.float32)
        return r

    @triton.jit
    def _load(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols):
        """The (rows, cols) tile at ptr + row * stride_r + col * stride_c, zero outside n_rows x n_cols."""
        return tl.load(
            ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
            mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
            other=0.0,
        )

    @triton.jit
    def _store(ptr, x, rows, cols, stride_r, n_rows, n_cols):
        """Store the fp32 (rows, cols) tile x at ptr + row * stride_r + col, converting to ptr's dtype."""
        tl.store(
            ptr + rows[:, None] * stride_r + cols[None, :],
            x.to(ptr.dtype.element_ty),
            mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
        )

    _FWD = tl.constexpr(0)  # OUT = O
    _DQ = tl.constexpr(1)  # OUT = dQ
    _DKDV = tl.constexpr(2)  # OUT = dK, OUT2 = dV

    # The dK/dV pass is a helper (Triton inlines it); the forward/dQ pass stays in the kernel body, because
    # as a helper it changes the order of the constants Triton hoists, and ptxas then gives fp32 dQ at head
    # dim 256 two more registers (`polyattn kernels --quick` shows it).
    @triton.jit
    def _key_block(
        Q, K, V, DO, OUT, OUT2, KMASK, R, scale, r_scalar, stride_rn, pid, bh, offs_d, offs_dv, NQ, NK, D, DV,
        ACT: tl.constexpr, POWER: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_R: tl.constexpr,
        LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):  # fmt: skip
        """dK (OUT) and dV (OUT2) of one block of keys; dK and dV stay in registers while the query blocks
        stream past."""
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        OUT += bh * NK * D
        OUT2 += bh * NK * DV
        k = _load(K, offs_n, offs_d, D, 1, NK, D)
        v = _load(V, offs_n, offs_dv, DV, 1, NK, DV)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
        lo = 0
        if CAUSAL:
            lo = (pid * BLOCK_N // BLOCK_M) * BLOCK_M  # query i sees key j only when i >= j
        for start_m in range(lo, NQ, BLOCK_M):
            # S^T (keys x queries) directly, so phi(S)^T and dS^T feed dV and dK without transposes.
            offs_m = start_m + tl.arange(0, BLOCK_M)
            qt = _load(Q, offs_d, offs_m, 1, D, D, NQ)
            r = _row_factor(R, offs_m, NQ, stride_rn, r_scalar, HAS_R)
            dor = _load(DO, offs_m, offs_dv, DV, 1, NQ, DV).to(tl.float32) * r[:, None]
            ok = _valid_t(offs_m, offs_n, NQ, NK, KMASK, HAS_MASK, CAUSAL)
            st = tl.where(ok, _dot(k, qt, LOWP, NATIVE_LOWP) * scale, 0.0)
            at = tl.where(ok, _phi(st, ACT, POWER), 0.0)
            dv += _dot(at, dor, LOWP, NATIVE_LOWP)
            dst = tl.where(ok, _dot(v, tl.trans(dor), LOWP, NATIVE_LOWP) * _dphi(st, ACT, POWER), 0.0)
            dk += _dot(dst, tl.trans(qt), LOWP, NATIVE_LOWP)
        _store(OUT, dk * scale, offs_n, offs_d, D, NK, D)
        _store(OUT2, dv, offs_n, offs_dv, DV, NK, DV)

    @triton.jit
    def _attention_kernel(
        Q, K, V, DO, OUT, OUT2, KMASK, R, scale, r_scalar, stride_mb, stride_rb, stride_rn, NQ, NK, D, DV,
        PASS: tl.constexpr, ACT: tl.constexpr, POWER: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
        HAS_R: tl.constexpr, LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):  # fmt: skip
        # Grid: (blocks of queries, or of keys for _DKDV; BH). 64-bit head offsets: BH * N * d may pass 2^31.
        pid = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        Q += bh * NQ * D
        K += bh * NK * D
        V += bh * NK * DV
        DO += bh * NQ * DV
        KMASK += bh * stride_mb
        R += bh * stride_rb
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        if PASS == _DKDV:
            _key_block(
                Q, K, V, DO, OUT, OUT2, KMASK, R, scale, r_scalar, stride_rn, pid, bh, offs_d, offs_dv, NQ, NK, D,
                DV, ACT, POWER, CAUSAL, HAS_MASK, HAS_R, LOWP, NATIVE_LOWP, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
            )  # fmt: skip
        else:
            # One block of queries, the key blocks streamed past: O (forward) or dQ.
            offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            q = _load(Q, offs_m, offs_d, D, 1, NQ, D)
            r = _row_factor(R, offs_m, NQ, stride_rn, r_scalar, HAS_R)
            if PASS == _FWD:
                OUT += bh * NQ * DV
                acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
            else:
                OUT += bh * NQ * D
                dor = _load(DO, offs_m, offs_dv, DV, 1, NQ, DV).to(tl.float32) * r[:, None]
                acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            hi = NK
            if CAUSAL:
                hi = tl.minimum(NK, (pid + 1) * BLOCK_M)
            for start_n in range(0, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                ok = _valid(offs_m, offs_n, NQ, NK, KMASK, HAS_MASK, CAUSAL)
                if PASS == _FWD:
                    kt = _load(K, offs_d, offs_n, 1, D, D, NK)
                    s = tl.where(ok, _dot(q, kt, LOWP, NATIVE_LOWP) * scale, 0.0)
                    a = tl.where(ok, _phi(s, ACT, POWER), 0.0)
                    acc += _dot(a, _load(V, offs_n, offs_dv, DV, 1, NK, DV), LOWP, NATIVE_LOWP)
                else:
                    k = _load(K, offs_n, offs_d, D, 1, NK, D)
                    vt = _load(V, offs_dv, offs_n, 1, DV, DV, NK)
                    s = tl.where(ok, _dot(q, tl.trans(k), LOWP, NATIVE_LOWP) * scale, 0.0)
                    ds = tl.where(ok, _dot(dor, vt, LOWP, NATIVE_LOWP) * _dphi(s, ACT, POWER), 0.0)
                    acc += _dot(ds, k, LOWP, NATIVE_LOWP)
            if PASS == _FWD:
                _store(OUT, acc * r[:, None], offs_m, offs_dv, DV, NQ, DV)
            else:
                _store(OUT, acc * scale, offs_m, offs_d, D, NQ, D)

    _KEY = ["PASS", "NQ", "NK", "BLOCK_D", "BLOCK_DV", "ACT", "POWER", "CAUSAL", "HAS_MASK", "LOWP"]

    def _arch_of(t: torch.Tensor) -> int:
        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor

    def _prune(configs, named_args, **kwargs):
        return prune_to(_GPU_CONFIGS, _arch_of(named_args["Q"]), configs, kwargs)

    def prune_to(table: dict, arch: int, configs: list, kwargs: dict) -> list:
        """The autotuner holds the union of every list of a launch table; each call times only its own."""
        block_d = max(kwargs["BLOCK_D"], kwargs["BLOCK_DV"])
        wanted = set(pick_configs(table, kwargs["PASS"], kwargs["LOWP"], block_d, arch))
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    def autotuned(kernel, table: dict, key: list[str], prune):
        """``kernel`` autotuned over the union of a launch table's lists, pruned per call by ``prune``."""
        union = sorted({c for configs in table.values() for c in configs})
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in union]
        return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)

    _TUNED: list = []

    def _kernel():
        if interpreter_active():
            return _attention_kernel
        if not _TUNED:
            _TUNED.append(autotuned(_attention_kernel, _GPU_CONFIGS, _KEY, _prune))
        return _TUNED[0]


def _launch(pass_: int, q, k, v, do, out, out2, kmask, r, meta: dict, blocks: tuple[int, int]) -> None:
    """Run one pass over contiguous (BH, N, d) tensors; do and out2 are ignored where the pass has none."""
    bh, nq, d = q.shape
    nk, dv = k.shape[1], v.shape[2]
    if not (nq and nk):
        return
    km = kmask if kmask is not None else q  # never read when HAS_MASK is False
    rr = r if r is not None else q
    stride_mb = 0 if kmask is None or kmask.shape[0] == 1 else kmask.stride(0)
    stride_rb = 0 if r is None or r.shape[0] == 1 else r.stride(0)
    stride_rn = 0 if r is None or r.shape[1] == 1 else r.stride(1)
    args = (
        q,
        k,
        v,
        do,
        out,
        out2,
        km,
        rr,
        meta["scale"],
        meta["r_scalar"],
        stride_mb,
        stride_rb,
        stride_rn,
        nq,
        nk,
        d,
        dv,
    )
    by_keys = pass_ == 2
    kernel = _kernel()
    if interpreter_active():
        bm, bn = blocks
        kernel[(triton.cdiv(nk if by_keys else nq, bn if by_keys else bm), bh)](
            *args, PASS=pass_, **meta["const"], BLOCK_M=bm, BLOCK_N=bn
        )
    else:

        def grid(m):
            return (triton.cdiv(nk, m["BLOCK_N"]) if by_keys else triton.cdiv(nq, m["BLOCK_M"]), bh)

        kernel[grid](*args, PASS=pass_, **meta["const"])


def _meta(q, v, kmask, r, scale, r_scalar, act, power, causal) -> dict:
    lowp = q.dtype == torch.bfloat16
    return {
        "scale": scale,
        "r_scalar": r_scalar,
        "const": {
            "ACT": act,
            "POWER": power,
            "CAUSAL": causal,
            "HAS_MASK": kmask is not None,
            "HAS_R": r is not None,
            "LOWP": lowp,
            "NATIVE_LOWP": lowp and not interpreter_active(),
            "BLOCK_D": max(16, triton.next_power_of_2(q.shape[2])),
            "BLOCK_DV": max(16, triton.next_power_of_2(v.shape[2])),
        },
    }


# The kernels as torch custom ops, with fake (shape-only) implementations and autograd, so that
# torch.compile(fullgraph=True) traces through the backend instead of breaking the graph at an
# opaque Python call. q, k, v are contiguous (BH, N, d); kmask (BH or 1, Nk) int8; r (BH or 1,
# Nq or 1) fp32 row factors (None: r_scalar for every row).
@torch.library.custom_op("polyattn::triton_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kmask: torch.Tensor | None,
    r: torch.Tensor | None,
    scale: float,
    r_scalar: float,
    act: int,
    power: int,
    causal: bool,
    block_m: int,
    block_n: int,
) -> torch.Tensor:
    alloc = torch.empty if q.shape[1] and k.shape[1] else torch.zeros  # the kernel writes every row it sees
    out = alloc(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    meta = _meta(q, v, kmask, r, scale, r_scalar, act, power, causal)
    _launch(0, q, k, v, q, out, out, kmask, r, meta, (block_m, block_n))
    return out


@_attention_op.register_fake
def _(q, k, v, kmask, r, scale, r_scalar, act, power, causal, block_m, block_n):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


@torch.library.custom_op("polyattn::triton_attention_backward", mutates_args=())
def _attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kmask: torch.Tensor | None,
    r: torch.Tensor | None,
    scale: float,
    r_scalar: float,
    act: int,
    power: int,
    causal: bool,
    block_m: int,
    block_n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    meta = _meta(q, v, kmask, r, scale, r_scalar, act, power, causal)
    _launch(2, q, k, v, dout, dk, dv, kmask, r, meta, (block_m, block_n))
    _launch(1, q, k, v, dout, dq, dq, kmask, r, meta, (block_m, block_n))
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(dout, q, k, v, kmask, r, scale, r_scalar, act, power, causal, block_m, block_n):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kmask, r, *params = inputs
    ctx.save_for_backward(q, k, v, kmask, r)
    ctx.params = params


def _backward(ctx, dout):
    refuse_double_backward("triton")
    q, k, v, kmask, r = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(dout.contiguous(), q, k, v, kmask, r, *ctx.params)
    return (dq, dk, dv) + (None,) * (2 + len(ctx.params))


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _compute(call: Call, block_sizes: tuple[int, int] = (16, 16)) -> torch.Tensor:
    """Fused attention for elementwise activations; ``block_sizes`` applies in the interpreter only
    (on a GPU the autotuner picks them)."""
    act = call.activation
    r = call.row_factors(torch.float32)
    r_tensor = r.reshape(r.shape[0], r.shape[1]).contiguous() if isinstance(r, torch.Tensor) else None
    flags = call.key_flags()
    kmask = flags.to(torch.int8).contiguous() if flags is not None else None
    bm, bn = (int(b) for b in block_sizes)
    return _attention_op(
        call.q,
        call.k,
        call.v,
        kmask,
        r_tensor,
        float(call.scale_value),
        float(r) if r_tensor is None else 1.0,
        _ACT_CODES[act.kind],
        int(act.power),
        bool(call.causal),
        bm,
        bn,
    )


run = backend_run(NAME, unsupported, _compute)
triton_attention = run


def variant_grid(
    kernel,
    signature,
    fixed: dict,
    table: dict,
    arch: int,
    head_dims: tuple[int, ...],
    dtypes: tuple[str, ...],
    activations: tuple[str, ...] | None,
    causal: tuple[bool, ...],
    passes: tuple[int, ...],
    quick: bool,
) -> list:
    """The KernelVariants of a kernel with the PASS/ACT/POWER/CAUSAL/HAS_R/LOWP/BLOCK_D constexprs of
    this module's kernels: each dtype x head dim x activation x causal x pass, the launch configurations
    from ``table`` (see :func:`pick_configs`); ``signature(ptr)`` gives the runtime arguments for a
    pointer type ("*bf16"), ``fixed`` the kernel's other constexprs."""
    from .kernel_check import KernelVariant, LaunchConfig

    if quick:
        activations, causal = ("gelu",), (True,)
    out = []
    for dtype in dtypes:
        sig = signature(f"*{dtype}")
        lowp = dtype == "bf16"
        for d in head_dims:
            block_d = max(16, triton.next_power_of_2(d))
            for act_name in activations if activations is not None else tuple(_CHECK_ACTIVATIONS):
                kind, power = _CHECK_ACTIVATIONS[act_name]
                for is_causal in causal:
                    for pass_ in passes:
                        constexprs = {"PASS": pass_, "ACT": _ACT_CODES[kind], "POWER": power, "CAUSAL": is_causal}
                        constexprs |= {**fixed, "HAS_R": True, "LOWP": lowp, "NATIVE_LOWP": lowp}
                        constexprs |= {"BLOCK_D": block_d, "BLOCK_DV": block_d}
                        configs = tuple(
                            LaunchConfig((("BLOCK_M", m), ("BLOCK_N", n)), w, st)
                            for m, n, w, st in pick_configs(table, pass_, lowp, block_d, arch)
                        )
                        tags = {"pass": _PASSES[pass_], "head_dim": d, "dtype": dtype}
                        tags |= {"activation": act_name, "causal": is_causal}
                        out.append(KernelVariant(kernel, sig, constexprs, configs, tags))
    return _largest_head_dim_only(out) if quick else out
