"""softmax through ``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention and friends).

polyattn's semantics on top of SDPA's: a row with nothing to attend outputs
zeros (SDPA's answer for such rows differs between kernels and versions, so
those rows are unmasked before the call and zeroed after it, which also keeps
NaN out of the gradients); ``bias`` and ``attn_mask`` may be given together;
``causal`` combines with a mask (SDPA takes one or the other, so the two are
merged into one (Nq, Nk) mask).

SDPA's fused kernels (FlashAttention, memory-efficient, cuDNN, and the CPU
flash kernel) are differentiable once; its math kernel (taken e.g. for a bias
that requires grad, or dropout on CPU) twice. A double backward through a
fused kernel fails in PyTorch with "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
implemented", which does not say what to do, so the first backward under
``create_graph=True`` raises polyattn's "use backend='reference'" instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..masking import combine_masks
from .common import Call, CallInfo, Estimate, MachineRates, backend_run, refuse_double_backward

__all__ = ["NAME", "cost", "run", "sdpa_attention", "unsupported"]

NAME = "sdpa"
SUMMARY = "softmax by F.scaled_dot_product_attention"
NATIVE_CUDA_DTYPES = (torch.float16, torch.bfloat16)

# The cost model: SDPA's seven products (forward S and P v; backward S again,
# dV, dP, dQ, dK: the fused kernels keep no P) at its own measured rate, a
# fixed cost per call, ~4 PyTorch ops around it, and with causal + a mask or
# bias the merged (Nq, Nk) mask, built and read once each.
_PRODUCTS = 7
_OPS = 4
_MERGED_MASK_PASSES = 2


def unsupported(info: CallInfo) -> str | None:
    if not info.activation.is_softmax:
        return f"SDPA computes softmax only, not {info.activation.spec!r}"
    return None


def cost(info: CallInfo, rates: MachineRates) -> Estimate:
    t = _PRODUCTS * info.product_flops / rates.sdpa_flops + rates.sdpa_fixed + rates.seconds(ops=_OPS)
    if info.causal and (info.mask or info.has_bias):
        t += rates.seconds(streamed=_MERGED_MASK_PASSES * info.nq * info.nk)
    return Estimate(t, "FlashAttention-style fused softmax")


class _KernelSeen:
    """Filled in after the SDPA call: whether it ran a fused (once-differentiable) kernel."""

    fused = False


class _GuardDoubleBackward(torch.autograd.Function):
    """Identity on the inputs of SDPA; its backward runs after SDPA's.

    On the inputs, not the output, so that no view made by a custom Function
    reaches the caller (in-place ops on those are forbidden).
    """

    @staticmethod
    def forward(ctx, seen: _KernelSeen, *tensors: torch.Tensor):
        ctx.seen = seen
        return tensors

    @staticmethod
    def backward(ctx, *grads):
        if ctx.seen.fused:
            refuse_double_backward("sdpa", " (a fused SDPA kernel ran)")
        return (None, *grads)


def _is_fused(out: torch.Tensor) -> bool:
    # The fused kernels are single autograd nodes named ScaledDotProduct*Backward
    # (Flash, Efficient, Cudnn, FlashAttentionForCpu); the math kernel is
    # decomposed into ordinary, twice differentiable ops.
    return out.grad_fn is not None and type(out.grad_fn).__name__.startswith("ScaledDotProduct")


def _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale) -> torch.Tensor:
    """F.scaled_dot_product_attention, refusing a double backward through a fused kernel with a hint."""
    # Compiled graphs have no double backward at all (AOTAutograd says so), and
    # inspecting grad_fn is not traceable: the guard is for eager calls only.
    guard = torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(t.requires_grad for t in (q, k, v))
    if not guard:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    seen = _KernelSeen()
    # One guard output per distinct tensor: self-attention may pass q is k is v.
    distinct = list({id(t): t for t in (q, k, v) if t.requires_grad}.values())
    guarded = dict(zip((id(t) for t in distinct), _GuardDoubleBackward.apply(seen, *distinct), strict=True))
    q, k, v = (guarded.get(id(t), t) for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )
    seen.fused = _is_fused(out)
    return out


def _compute(call: Call) -> torch.Tensor:
    """softmax attention by SDPA with polyattn's mask semantics."""
    batch = call.batch
    q, k, v = (t if tuple(t.shape[:-2]) == batch else t.expand(*batch, *t.shape[-2:]) for t in (call.q, call.k, call.v))
    nq, nk = q.shape[-2], k.shape[-2]
    mask, bias, causal = call.attn_mask, call.bias, call.causal
    if causal and (mask is not None or bias is not None):
        mask = combine_masks(mask, True, nq, nk, q.device)
        causal = False
    has_any = None
    if mask is not None:
        # Rows with no allowed key: let SDPA attend everything there, zero them after.
        has_any = mask.any(dim=-1, keepdim=True)
        mask = mask | ~has_any
    sdpa_mask: torch.Tensor | None = mask
    if bias is not None:
        b = bias.to(q.dtype)
        sdpa_mask = b if mask is None else b.masked_fill(~mask, float("-inf"))
    out = _sdpa(q, k, v, sdpa_mask, call.dropout_p, causal, call.scale)
    if has_any is not None:
        out = out.masked_fill(~has_any, 0.0)
    return out


run = backend_run(NAME, unsupported, _compute, flat=False)
sdpa_attention = run
