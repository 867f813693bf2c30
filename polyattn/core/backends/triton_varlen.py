"""The fused Triton kernel over packed documents (``attention_varlen(..., backend="triton")``).

As flash-attn's varlen kernels: the grid is (blocks of the longest document, documents, heads), and
each program reads its document's offsets from ``cu_seqlens_q``/``cu_seqlens_k`` and works on that
document's rows only; a program past its document's end returns at once. q, k, v, dO and the
gradients stay in the packed (total, heads, d) layout (rows H * d apart), so nothing is copied or
padded. Grouped-query attention: query head h reads k/v head h // G; the dK/dV program of a k/v head
streams the queries of its G query heads. The per-row factor (1/divisor with N counted per document)
is one fp32 number per packed row. The tile maths (phi, phi', the dots and their precision) are those
of :mod:`.triton_kernels`, whose helpers this module calls.
"""

from __future__ import annotations

import torch

from ..activations import Activation
from .common import refuse_double_backward
from .triton_kernels import (
    _ACT_CODES,
    _CHECK_HEAD_DIMS,
    interpreter_active,
    pick_configs,
    triton,
    variant_grid,
)

if triton is not None:
    import triton.language as tl

    from .triton_kernels import _arch_of, _dot, _dphi, _load, _phi, _store, autotuned, prune_to

__all__ = ["compile_variants", "launch_configs", "triton_varlen"]

if triton is not None:

    @triton.jit
    def _varlen_key_block(
        Q, K, V, DO, OUT, OUT2, R, scale, r_scalar, pid, head, q0, k0, NQ, NK, sq, sk, sv, sdo, GROUPS, offs_d,
        offs_dv, D, DV, ACT: tl.constexpr, POWER: tl.constexpr, CAUSAL: tl.constexpr, HAS_R: tl.constexpr,
        LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):  # fmt: skip
        """dK (OUT) and dV (OUT2) of one block of one document's keys of k/v head `head`; the G query
        heads' rows stream past."""
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        Kh = K + k0 * sk + head * D
        Vh = V + k0 * sv + head * DV
        k = _load(Kh, offs_n, offs_d, sk, 1, NK, D)
        v = _load(Vh, offs_n, offs_dv, sv, 1, NK, DV)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
        lo = 0
        if CAUSAL:
            lo = (pid * BLOCK_N // BLOCK_M) * BLOCK_M
        for g in range(0, GROUPS):
            h = head * GROUPS + g
            Qh = Q + q0 * sq + h * D
            DOh = DO + q0 * sdo + h * DV
            for start_m in range(lo, NQ, BLOCK_M):
                # S^T (keys x queries), as the dense dK/dV pass: phi(S)^T and dS^T feed dV and dK with no
                # register transposes (with them, fp32 tiles at head dim 128 spilled kilobytes on sm_80/90).
                offs_m = start_m + tl.arange(0, BLOCK_M)
                qt = _load(Qh, offs_d, offs_m, 1, sq, D, NQ)
                if HAS_R:
                    r = tl.load(R + q0 + offs_m, mask=offs_m < NQ, other=0.0)
                else:
                    r = tl.full(offs_m.shape, r_scalar, tl.float32)
                dor = _load(DOh, offs_m, offs_dv, sdo, 1, NQ, DV).to(tl.float32) * r[:, None]
                ok = (offs_n[:, None] < NK) & (offs_m[None, :] < NQ)
                if CAUSAL:
                    ok = ok & (offs_n[:, None] <= offs_m[None, :])
                st = tl.where(ok, _dot(k, qt, LOWP, NATIVE_LOWP) * scale, 0.0)
                at = tl.where(ok, _phi(st, ACT, POWER), 0.0)
                dv += _dot(at, dor, LOWP, NATIVE_LOWP)
                dst = tl.where(ok, _dot(v, tl.trans(dor), LOWP, NATIVE_LOWP) * _dphi(st, ACT, POWER), 0.0)
                dk += _dot(dst, tl.trans(qt), LOWP, NATIVE_LOWP)
        _store(OUT + k0 * sk + head * D, dk * scale, offs_n, offs_d, sk, NK, D)
        _store(OUT2 + k0 * sv + head * DV, dv, offs_n, offs_dv, sv, NK, DV)

    @triton.jit
    def _varlen_kernel(
        Q, K, V, DO, OUT, OUT2, CU_Q, CU_K, R, scale, r_scalar, HEADS, GROUPS, D, DV,
        PASS: tl.constexpr, ACT: tl.constexpr, POWER: tl.constexpr, CAUSAL: tl.constexpr, HAS_R: tl.constexpr,
        LOWP: tl.constexpr, NATIVE_LOWP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):  # fmt: skip
        # Grid: (query blocks, or key blocks for dK/dV; documents; query heads, or k/v heads for dK/dV).
        pid = tl.program_id(0)
        doc = tl.program_id(1)
        head = tl.program_id(2).to(tl.int64)
        q0 = tl.load(CU_Q + doc).to(tl.int64)
        k0 = tl.load(CU_K + doc).to(tl.int64)
        NQ = (tl.load(CU_Q + doc + 1) - q0).to(tl.int32)
        NK = (tl.load(CU_K + doc + 1) - k0).to(tl.int32)
        KV_HEADS = HEADS // GROUPS
        sq, sdo = HEADS * D, HEADS * DV  # row strides of q (and dQ), of dO (and O)
        sk, sv = KV_HEADS * D, KV_HEADS * DV
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        if PASS == 2:
            if pid * BLOCK_N >= NK:
                return
            _varlen_key_block(
                Q, K, V, DO, OUT, OUT2, R, scale, r_scalar, pid, head, q0, k0, NQ, NK, sq, sk, sv, sdo, GROUPS,
                offs_d, offs_dv, D, DV, ACT, POWER, CAUSAL, HAS_R, LOWP, NATIVE_LOWP, BLOCK_M, BLOCK_N, BLOCK_D,
                BLOCK_DV,
            )  # fmt: skip
        else:
            if pid * BLOCK_M >= NQ:
                return
            # One block of one document's query rows of head `head`; that document's keys stream past.
            kvh = head // GROUPS
            offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            Kh = K + k0 * sk + kvh * D
            Vh = V + k0 * sv + kvh * DV
            q = _load(Q + q0 * sq + head * D, offs_m, offs_d, sq, 1, NQ, D)
            if HAS_R:
                r = tl.load(R + q0 + offs_m, mask=offs_m < NQ, other=0.0)
            else:
                r = tl.full(offs_m.shape, r_scalar, tl.float32)
            if PASS == 0:
                acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
            else:
                dor = _load(DO + q0 * sdo + head * DV, offs_m, offs_dv, sdo, 1, NQ, DV).to(tl.float32) * r[:, None]
                acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            hi = NK
            if CAUSAL:
                hi = tl.minimum(NK, (pid + 1) * BLOCK_M)
            for start_n in range(0, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                ok = (offs_m[:, None] < NQ) & (offs_n[None, :] < NK)
                if CAUSAL:
                    ok = ok & (offs_n[None, :] <= offs_m[:, None])
                k = _load(Kh, offs_n, offs_d, sk, 1, NK, D)
                s = tl.where(ok, _dot(q, tl.trans(k), LOWP, NATIVE_LOWP) * scale, 0.0)
                if PASS == 0:
                    a = tl.where(ok, _phi(s, ACT, POWER), 0.0)
                    acc += _dot(a, _load(Vh, offs_n, offs_dv, sv, 1, NK, DV), LOWP, NATIVE_LOWP)
                else:
                    vt = _load(Vh, offs_dv, offs_n, 1, sv, DV, NK)
                    ds = tl.where(ok, _dot(dor, vt, LOWP, NATIVE_LOWP) * _dphi(s, ACT, POWER), 0.0)
                    acc += _dot(ds, k, LOWP, NATIVE_LOWP)
            if PASS == 0:
                _store(OUT + q0 * sdo + head * DV, acc * r[:, None], offs_m, offs_dv, sdo, NQ, DV)
            else:
                _store(OUT + q0 * sq + head * D, acc * scale, offs_m, offs_d, sq, NQ, D)

    _KEY = ["PASS", "BLOCK_D", "BLOCK_DV", "ACT", "POWER", "CAUSAL", "LOWP"]

    def _prune(configs, named_args, **kwargs):
        return prune_to(_GPU_CONFIGS, _arch_of(named_args["Q"]), configs, kwargs)

    _TUNED: list = []

    def _kernel():
        if interpreter_active():
            return _varlen_kernel
        if not _TUNED:
            _TUNED.append(autotuned(_varlen_kernel, _GPU_CONFIGS, _KEY, _prune))
        return _TUNED[0]


# Launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) by GPU generation, pass, dtype and
# padded head dimension, as the dense kernel's (see triton_kernels._GPU_CONFIGS, whose rules hold
# here too); `polyattn kernels` compiles each for sm_80 and sm_90 and fails on a spill.
_Configs = tuple[tuple[int, int, int, int], ...]
_FP32_CONFIGS: dict[tuple[str, int], _Configs] = {  # the same lists for both generations
    ("fwd", 64): ((16, 32, 4, 2),),
    ("fwd", 128): ((16, 32, 4, 2),),
    ("dq", 64): ((32, 32, 4, 2),),
    ("dq", 128): ((16, 32, 4, 2),),
    ("dkdv", 128): ((16, 16, 8, 2),),
    ("fwd", 256): ((16, 16, 4, 2),),
    ("dq", 256): ((16, 16, 4, 2),),
    ("dkdv", 256): ((16, 16, 8, 2),),  # spills up to 144 B on some variants
}
_GPU_CONFIGS: dict[tuple[int, str, str, int], _Configs] = {
    (90, "fwd", "bf16", 64): ((128, 64, 8, 3), (64, 64, 4, 3)),
    (90, "fwd", "bf16", 128): ((64, 64, 4, 3), (64, 32, 4, 3)),
    (90, "dq", "bf16", 64): ((128, 64, 8, 3),),
    (90, "dq", "bf16", 128): ((64, 32, 8, 3), (32, 32, 4, 3)),
    (90, "dkdv", "bf16", 64): ((16, 64, 4, 3),),
    (90, "dkdv", "bf16", 128): ((32, 32, 8, 3),),
    (90, "fwd", "bf16", 256): ((64, 32, 8, 3),),
    (90, "dq", "bf16", 256): ((16, 32, 8, 3),),
    (90, "dkdv", "bf16", 256): ((16, 16, 8, 3), (16, 16, 4, 3)),
    (80, "fwd", "bf16", 64): ((64, 32, 4, 3), (32, 32, 4, 3)),
    (80, "fwd", "bf16", 128): ((64, 64, 8, 3), (64, 32, 4, 3)),
    (80, "dq", "bf16", 64): ((64, 32, 4, 3), (32, 32, 4, 3)),
    (80, "dq", "bf16", 128): ((32, 32, 4, 3), (16, 64, 4, 3)),
    (80, "dkdv", "bf16", 64): ((32, 32, 8, 3),),
    (80, "dkdv", "bf16", 128): ((16, 32, 8, 3),),  # spills 40 B on 2 of 14 variants
    (80, "fwd", "bf16", 256): ((32, 32, 4, 3),),
    (80, "dq", "bf16", 256): ((16, 32, 4, 3),),
    (80, "dkdv", "bf16", 256): ((16, 16, 8, 3),),  # spills up to 144 B on 7 of 14
}
for _arch in (80, 90):  # fp32 dots run on CUDA cores alike on both generations
    for (_pass, _bucket_d), _configs in _FP32_CONFIGS.items():
        _GPU_CONFIGS[(_arch, _pass, "fp32", _bucket_d)] = _configs
# fp32 dK/dV at head dim 64: no one tile is clean on both (sm_80 spills up to 56 B in 16x16 w8).
_GPU_CONFIGS[(90, "dkdv", "fp32", 64)] = ((32, 16, 4, 2),)
_GPU_CONFIGS[(80, "dkdv", "fp32", 64)] = ((16, 16, 8, 2),)


def launch_configs(pass_: int, lowp: bool, block_d: int, arch: int) -> _Configs:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) choices of one pass at a padded head dimension
    on compute capability ``arch``; Hopper and later take the sm_90 lists."""
    return pick_configs(_GPU_CONFIGS, pass_, lowp, block_d, arch)


def compile_variants(
    arch: int = 90,
    head_dims: tuple[int, ...] = _CHECK_HEAD_DIMS,
    dtypes: tuple[str, ...] = ("bf16", "fp32"),
    activations: tuple[str, ...] | None = None,
    causal: tuple[bool, ...] = (False, True),
    passes: tuple[int, ...] = (0, 1, 2),
    quick: bool = False,
) -> list:
    """Every specialisation of the varlen kernel `polyattn kernels` compiles, with its launch
    configurations (``quick`` as in :func:`.triton_kernels.compile_variants`)."""

    def signature(ptr: str) -> dict[str, str]:
        sig = {name: ptr for name in ("Q", "K", "V", "DO", "OUT", "OUT2")}
        sig |= {"CU_Q": "*i32", "CU_K": "*i32", "R": "*fp32", "scale": "fp32", "r_scalar": "fp32"}
        return sig | {name: "i32" for name in ("HEADS", "GROUPS", "D", "DV")}

    grid = (arch, head_dims, dtypes, activations, causal, passes, quick)
    return variant_grid(_varlen_kernel, signature, {}, _GPU_CONFIGS, *grid)


def _launch(pass_: int, q, k, v, do, out, out2, cu_q, cu_k, r, meta: dict) -> None:
    heads, kv_heads = q.shape[1], k.shape[1]
    docs = cu_q.numel() - 1
    args = (q, k, v, do, out, out2, cu_q, cu_k, r if r is not None else q, meta["scale"], meta["r_scalar"])
    args += (heads, heads // kv_heads, q.shape[2], v.shape[2])
    by_keys = pass_ == 2
    longest = meta["max_k"] if by_keys else meta["max_q"]
    if longest == 0 or docs == 0:
        return
    grid_heads = kv_heads if by_keys else heads
    kernel = _kernel()
    if interpreter_active():
        bm, bn = meta["blocks"]
        kernel[(triton.cdiv(longest, bn if by_keys else bm), docs, grid_heads)](
            *args, PASS=pass_, **meta["const"], BLOCK_M=bm, BLOCK_N=bn
        )
    else:

        def grid(m):
            return (triton.cdiv(longest, m["BLOCK_N"] if by_keys else m["BLOCK_M"]), docs, grid_heads)

        kernel[grid](*args, PASS=pass_, **meta["const"])


class _VarlenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, r, meta):
        out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
        _launch(0, q, k, v, q, out, out, cu_q, cu_k, r, meta)
        ctx.save_for_backward(q, k, v, cu_q, cu_k, r)
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx, dout):
        refuse_double_backward("triton")
        q, k, v, cu_q, cu_k, r = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        _launch(2, q, k, v, dout, dk, dv, cu_q, cu_k, r, ctx.meta)
        _launch(1, q, k, v, dout, dq, dq, cu_q, cu_k, r, ctx.meta)
        return dq, dk, dv, None, None, None, None


def triton_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    activation: Activation,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    causal: bool,
    scale: float,
    row_counts: torch.Tensor | None,
    block_sizes: tuple[int, int] = (16, 16),
) -> torch.Tensor:
    """Packed (total_q, H, d) x (total_k, Hk, d) -> (total_q, H, dv); inputs fp32 or (on a GPU) bf16.

    ``row_counts`` (total_q,): keys per row for /sqrt(N), /N (None otherwise); ``block_sizes`` applies
    in the interpreter only (on a GPU the autotuner picks them).
    """
    lowp = q.dtype == torch.bfloat16
    r = None
    r_scalar = 1.0
    if activation.divisor is not None:
        if activation.is_dynamic:
            r = (1.0 / activation.divisor_value(row_counts.to(torch.float32))).contiguous()
        else:
            r_scalar = 1.0 / float(activation.divisor_value(1))
    d, dv = q.shape[2], v.shape[2]
    meta = {
        "scale": scale,
        "r_scalar": r_scalar,
        "max_q": max_q,
        "max_k": max_k,
        "blocks": tuple(block_sizes),
        "const": {
            "ACT": _ACT_CODES[activation.kind],
            "POWER": activation.power,
            "CAUSAL": bool(causal),
            "HAS_R": r is not None,
            "LOWP": lowp,
            "NATIVE_LOWP": lowp and not interpreter_active(),
            "BLOCK_D": max(16, triton.next_power_of_2(d)),
            "BLOCK_DV": max(16, triton.next_power_of_2(dv)),
        },
    }
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _VarlenFunction.apply(q, k, v, cu_q.contiguous(), cu_k.contiguous(), r, meta)
