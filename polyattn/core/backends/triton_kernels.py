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
because x^3 of a score of 40 overflows fp16.

Testing: ``TRITON_INTERPRET=1`` (set before this module is imported) runs the
kernels on CPU tensors; the interpreter mis-computes bf16 dots, so there the
tiles are upcast to fp32 before every dot.
"""

from __future__ import annotations

import os

import torch

from ..activations import Activation
from .common import (
    BackendUnsupported,
    BlockSource,
    flatten_heads,
    mask_kind,
    refuse_double_backward,
    row_counts,
    row_factors,
    unflatten,
)

try:  # triton is optional: CPU-only installs run every other backend
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = ["interpreter_active", "triton_attention", "triton_unavailable_reason", "triton_unsupported_reason"]

# Activation codes understood by the kernels.
_ACT_CODES = {"power": 0, "relu": 1, "elu": 2, "gelu": 3, "tanh": 4, "exp": 5, "sigmoid": 6}
_MAX_HEAD_DIM = 256


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
    return (
        f"the triton backend needs a CUDA device (got {device.type}; "
        "TRITON_INTERPRET=1 runs it on CPU, slowly)"
    )


def triton_unsupported_reason(
    activation: Activation,
    mask: str | None,
    has_bias: bool,
    dropout_p: float,
    d: int,
    dv: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> str | None:
    """Why ``triton`` cannot compute this call, or None when it can (dtype: the dtype it would receive)."""
    reason = triton_unavailable_reason(device)
    if reason is not None:
        return reason
    if dtype not in (torch.float32, torch.bfloat16):
        return f"the fused kernel computes float32 and bfloat16, not {dtype}"
    if activation.is_softmax:
        return "the fused kernel covers elementwise activations; softmax goes to SDPA"
    if has_bias:
        return "the fused kernel takes no additive bias"
    if dropout_p > 0.0:
        return "the fused kernel has no dropout"
    if mask == "full":
        return "the fused kernel takes key-padding masks (..., 1, Nk) only, not per-query masks"
    if max(d, dv) > _MAX_HEAD_DIM:
        return f"head dimension {max(d, dv)} > {_MAX_HEAD_DIM}"
    return None


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
    def _row_factor(R, bh, offs_m, NQ, stride_rb, stride_rn, r_scalar, HAS_R: tl.constexpr):
        if HAS_R:
            r = tl.load(R + bh * stride_rb + offs_m * stride_rn, mask=offs_m < NQ, other=0.0)
        else:
            r = tl.full(offs_m.shape, r_scalar, tl.float32)
        return r

    @triton.jit
    def _fwd_kernel(
        Q, K, V, O, KMASK, R,
        scale, r_scalar,
        stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_on,
        stride_mb, stride_rb, stride_rn,
        NQ, NK, D, DV,
        ACT: tl.constexpr, POWER: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
        HAS_R: tl.constexpr, LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q = tl.load(
            Q + bh * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :],
            mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D), other=0.0,
        )
        acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
        hi = NK
        if CAUSAL:
            hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt = tl.load(
                K + bh * stride_kb + offs_n[None, :] * stride_kn + offs_d[:, None],
                mask=(offs_n[None, :] < NK) & (offs_d[:, None] < D), other=0.0,
            )
            s = _dot(q, kt, LOWP, NATIVE_LOWP) * scale
            ok = _valid(offs_m, offs_n, NQ, NK, KMASK + bh * stride_mb, HAS_MASK, CAUSAL)
            s = tl.where(ok, s, 0.0)
            a = tl.where(ok, _phi(s, ACT, POWER), 0.0)
            v = tl.load(
                V + bh * stride_vb + offs_n[:, None] * stride_vn + offs_dv[None, :],
                mask=(offs_n[:, None] < NK) & (offs_dv[None, :] < DV), other=0.0,
            )
            acc += _dot(a, v, LOWP, NATIVE_LOWP)
        r = _row_factor(R, bh, offs_m, NQ, stride_rb, stride_rn, r_scalar, HAS_R)
        acc = acc * r[:, None]
        tl.store(
            O + bh * stride_ob + offs_m[:, None] * stride_on + offs_dv[None, :],
            acc.to(O.dtype.element_ty),
            mask=(offs_m[:, None] < NQ) & (offs_dv[None, :] < DV),
        )

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV_, KMASK, R,
        scale, r_scalar,
        stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn, stride_dob, stride_don,
        stride_mb, stride_rb, stride_rn,
        NQ, NK, D, DV,
        ACT: tl.constexpr, POWER: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
        HAS_R: tl.constexpr, LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        k = tl.load(
            K + bh * stride_kb + offs_n[:, None] * stride_kn + offs_d[None, :],
            mask=(offs_n[:, None] < NK) & (offs_d[None, :] < D), other=0.0,
        )
        v = tl.load(
            V + bh * stride_vb + offs_n[:, None] * stride_vn + offs_dv[None, :],
            mask=(offs_n[:, None] < NK) & (offs_dv[None, :] < DV), other=0.0,
        )
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
        lo = 0
        if CAUSAL:
            lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # query i sees key j only when i >= j
        for start_m in range(lo, NQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = tl.load(
                Q + bh * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D), other=0.0,
            )
            do = tl.load(
                DO + bh * stride_dob + offs_m[:, None] * stride_don + offs_dv[None, :],
                mask=(offs_m[:, None] < NQ) & (offs_dv[None, :] < DV), other=0.0,
            )
            r = _row_factor(R, bh, offs_m, NQ, stride_rb, stride_rn, r_scalar, HAS_R)
            dor = do.to(tl.float32) * r[:, None]
            s = _dot(q, tl.trans(k), LOWP, NATIVE_LOWP) * scale
            ok = _valid(offs_m, offs_n, NQ, NK, KMASK + bh * stride_mb, HAS_MASK, CAUSAL)
            s = tl.where(ok, s, 0.0)
            a = tl.where(ok, _phi(s, ACT, POWER), 0.0)
            dv += _dot(tl.trans(a), dor, LOWP, NATIVE_LOWP)
            da = _dot(dor, tl.trans(v), LOWP, NATIVE_LOWP)
            ds = tl.where(ok, da * _dphi(s, ACT, POWER), 0.0)
            dk += _dot(tl.trans(ds), q, LOWP, NATIVE_LOWP)
        dk = dk * scale
        tl.store(
            DK + bh * stride_kb + offs_n[:, None] * stride_kn + offs_d[None, :],
            dk.to(DK.dtype.element_ty),
            mask=(offs_n[:, None] < NK) & (offs_d[None, :] < D),
        )
        tl.store(
            DV_ + bh * stride_vb + offs_n[:, None] * stride_vn + offs_dv[None, :],
            dv.to(DV_.dtype.element_ty),
            mask=(offs_n[:, None] < NK) & (offs_dv[None, :] < DV),
        )

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DO, DQ, KMASK, R,
        scale, r_scalar,
        stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn, stride_dob, stride_don,
        stride_mb, stride_rb, stride_rn,
        NQ, NK, D, DV,
        ACT: tl.constexpr, POWER: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
        HAS_R: tl.constexpr, LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q = tl.load(
            Q + bh * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :],
            mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D), other=0.0,
        )
        do = tl.load(
            DO + bh * stride_dob + offs_m[:, None] * stride_don + offs_dv[None, :],
            mask=(offs_m[:, None] < NQ) & (offs_dv[None, :] < DV), other=0.0,
        )
        r = _row_factor(R, bh, offs_m, NQ, stride_rb, stride_rn, r_scalar, HAS_R)
        dor = do.to(tl.float32) * r[:, None]
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        hi = NK
        if CAUSAL:
            hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(
                K + bh * stride_kb + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=(offs_n[:, None] < NK) & (offs_d[None, :] < D), other=0.0,
            )
            vt = tl.load(
                V + bh * stride_vb + offs_n[None, :] * stride_vn + offs_dv[:, None],
                mask=(offs_n[None, :] < NK) & (offs_dv[:, None] < DV), other=0.0,
            )
            s = _dot(q, tl.trans(k), LOWP, NATIVE_LOWP) * scale
            ok = _valid(offs_m, offs_n, NQ, NK, KMASK + bh * stride_mb, HAS_MASK, CAUSAL)
            s = tl.where(ok, s, 0.0)
            da = _dot(dor, vt, LOWP, NATIVE_LOWP)
            ds = tl.where(ok, da * _dphi(s, ACT, POWER), 0.0)
            dq += _dot(ds, k, LOWP, NATIVE_LOWP)
        dq = dq * scale
        tl.store(
            DQ + bh * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D),
        )

    # GPU launch configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages). The
    # autotuner times each once per (NQ, NK, head dim, activation, causal).
    _GPU_CONFIGS = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 32, 4, 4)]
    _KEY = ["NQ", "NK", "BLOCK_D", "BLOCK_DV", "ACT", "POWER", "CAUSAL", "HAS_MASK", "LOWP"]

    def _autotuned(kernel):
        configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for m, n, w, st in _GPU_CONFIGS
        ]
        return triton.autotune(configs=configs, key=_KEY)(kernel)

    _TUNED: dict[str, object] = {}

    def _kernel(name: str):
        raw = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}[name]
        if interpreter_active():
            return raw
        if name not in _TUNED:
            _TUNED[name] = _autotuned(raw)
        return _TUNED[name]


def _launch(name: str, grid_dim: str, bh: int, nq: int, nk: int, args: tuple, meta: dict, blocks):
    kernel = _kernel(name)
    if interpreter_active():
        bm, bn = blocks
        grid = (triton.cdiv(nq if grid_dim == "m" else nk, bm if grid_dim == "m" else bn), bh)
        kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
    else:
        def grid(m):
            size, block = (nq, m["BLOCK_M"]) if grid_dim == "m" else (nk, m["BLOCK_N"])
            return (triton.cdiv(size, block), bh)

        kernel[grid](*args, **meta)


class _TritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kmask, r, meta, blocks):
        bh, nq, d = q.shape
        nk, dv = k.shape[1], v.shape[2]
        out = torch.empty(bh, nq, dv, dtype=q.dtype, device=q.device)
        ctx.save_for_backward(q, k, v, kmask, r)
        ctx.meta, ctx.blocks = meta, blocks
        if nq and nk:
            _launch("fwd", "m", bh, nq, nk, _args(q, k, v, out, kmask, r, meta), meta["const"], blocks)
        else:
            out.zero_()
        return out

    @staticmethod
    def backward(ctx, dout):
        refuse_double_backward("triton")
        q, k, v, kmask, r = ctx.saved_tensors
        meta, blocks = ctx.meta, ctx.blocks
        dout = dout.contiguous()
        bh, nq, _ = q.shape
        nk = k.shape[1]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if nq and nk:
            base = _args(q, k, v, dout, kmask, r, meta)
            dkdv_args = base[:4] + (dk, dv) + base[4:]
            _launch("dkdv", "n", bh, nq, nk, dkdv_args, meta["const"], blocks)
            dq_args = base[:4] + (dq,) + base[4:]
            _launch("dq", "m", bh, nq, nk, dq_args, meta["const"], blocks)
        return dq, dk, dv, None, None, None, None


def _args(q, k, v, fourth, kmask, r, meta) -> tuple:
    """Positional kernel arguments: tensors, scalars, strides, sizes (shared by the three kernels)."""
    bh, nq, d = q.shape
    nk, dv = k.shape[1], v.shape[2]
    km = kmask if kmask is not None else q  # never read when HAS_MASK is False
    rr = r if r is not None else q
    stride_mb = 0 if kmask is None or kmask.shape[0] == 1 else kmask.stride(0)
    stride_rb = 0 if r is None or r.shape[0] == 1 else r.stride(0)
    stride_rn = 0 if r is None or r.shape[1] == 1 else r.stride(1)
    return (
        q, k, v, fourth, km, rr,
        meta["scale"], meta["r_scalar"],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        fourth.stride(0), fourth.stride(1),
        stride_mb, stride_rb, stride_rn,
        nq, nk, d, dv,
    )


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    activation: Activation,
    attn_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    block_sizes: tuple[int, int] = (16, 16),
) -> torch.Tensor:
    """Fused attention for elementwise activations; ``block_sizes`` applies in the interpreter only
    (on a GPU the autotuner picks them)."""
    reason = triton_unsupported_reason(
        activation, mask_kind(attn_mask), bias is not None, dropout_p,
        q.shape[-1], v.shape[-1], q.device, q.dtype,
    )
    if reason is not None:
        raise BackendUnsupported(f"backend 'triton' cannot compute this call: {reason}; use backend='auto'")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    lowp = q.dtype == torch.bfloat16
    qf, kf, vf, batch = flatten_heads(q, k, v)
    bh, nq, d = qf.shape
    nk, dv = kf.shape[1], vf.shape[2]
    mask_src = BlockSource(attn_mask, batch) if attn_mask is not None else None
    counts = row_counts(mask_src, causal, nq, nk, qf.device) if activation.is_dynamic else None
    r = row_factors(activation, counts, nk, torch.float32)
    r_tensor = r.reshape(r.shape[0], r.shape[1]).contiguous() if isinstance(r, torch.Tensor) else None
    kmask = None
    if mask_src is not None:
        m = mask_src.flat[:, 0, :]
        if mask_src.cols_broadcast:
            m = m.expand(m.shape[0], nk)
        if mask_src.index is not None:
            m = m.index_select(0, mask_src.index)
        kmask = m.to(torch.int8).contiguous()
    meta = {
        "scale": float(scale),
        "r_scalar": float(r) if r_tensor is None else 1.0,
        "const": {
            "ACT": _ACT_CODES[activation.kind],
            "POWER": activation.power,
            "CAUSAL": bool(causal),
            "HAS_MASK": kmask is not None,
            "HAS_R": r_tensor is not None,
            "LOWP": lowp,
            "NATIVE_LOWP": lowp and not interpreter_active(),
            "BLOCK_D": max(16, triton.next_power_of_2(d)),
            "BLOCK_DV": max(16, triton.next_power_of_2(dv)),
        },
    }
    out = _TritonFunction.apply(qf, kf, vf, kmask, r_tensor, meta, tuple(block_sizes))
    return unflatten(out, batch)
