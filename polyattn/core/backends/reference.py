"""The readable definition of polyattn attention: materialise S and A, then A @ v.

Every other backend is tested against this one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..activations import Activation
from ..masking import combine_masks, valid_key_counts
from .common import Call, CallInfo, Estimate, MachineRates, backend_run

__all__ = ["NAME", "attention_weights", "cost", "reference_attention", "run", "unsupported"]

NAME = "reference"
SUMMARY = "materialised S and A (the definition)"

# The cost model, from the code below: six (Nq, Nk)-sized products (S, A v;
# backward dA, dV, dQ, dK: nothing is recomputed); about ten elementwise passes
# over (Nq, Nk) matrices forward and backward, four more for a mask's where/zeros
# and two for a dynamic divisor (N counted per row); four such matrices held
# for backward; ~30 PyTorch ops in all.
_PRODUCTS = 6
_PASSES, _MASK_PASSES, _DYNAMIC_PASSES = 10, 4, 2
_HELD_MATRICES = 4
_OPS = 30


def attention_weights(scores: torch.Tensor, activation: Activation, mask: torch.Tensor | None) -> torch.Tensor:
    """A = phi(S) with masked entries exactly zero; mask is bool, True = may attend.

    softmax: masked keys take no part in the normalisation. Other activations:
    phi is applied entrywise, divided by the row's divisor (N = attendable keys
    in that row), and masked entries are set to 0 afterwards. A large negative
    number is never added before phi: for x^3 that gives huge negative weights.
    A row with nothing to attend is all zeros, with finite gradients.
    """
    if activation.is_softmax:
        if mask is None:
            return torch.softmax(scores, dim=-1)
        # Masked scores become -inf *before* the max so an unmasked large score
        # at a masked position can neither overflow exp nor shift the max.
        neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
        s = torch.where(mask, scores, neg_inf)
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
        e = torch.exp(s - m)
        denom = e.sum(dim=-1, keepdim=True)
        # Empty rows have denom 0 and e 0: dividing by 1 there keeps them 0.
        return e / torch.where(denom > 0, denom, torch.ones_like(denom))

    if mask is None:
        return activation(scores, scores.shape[-1])
    # Zero the masked scores first so phi never sees a value that could
    # overflow (exp of a huge score) and poison the gradient with 0 * inf.
    s = torch.where(mask, scores, torch.zeros_like(scores))
    n = valid_key_counts(mask, s.shape)
    a = activation(s, n.to(s.dtype))
    return torch.where(mask, a, torch.zeros_like(a))


def unsupported(info: CallInfo) -> str | None:
    return None  # the definition computes everything, if slowly


def cost(info: CallInfo, rates: MachineRates) -> Estimate:
    e = max(info.bh * info.nq * info.nk, 1)  # the materialised path computes every entry, causal or not
    held = _HELD_MATRICES * e * 4
    if held > rates.memory_budget:
        return Estimate(math.inf, f"needs ~{held / 2**30:.1f} GiB of (Nq, Nk) matrices")
    passes = e * (
        _PASSES
        + (_MASK_PASSES if info.mask or info.causal else 0)
        + (_DYNAMIC_PASSES if info.activation.is_dynamic else 0)
    )
    in_cache = held <= rates.cache_bytes
    t = rates.seconds(
        flops=_PRODUCTS * e * (info.d + info.dv),
        cached=passes if in_cache else 0.0,
        streamed=0.0 if in_cache else passes,
        ops=_OPS,
    )
    return Estimate(t, f"materialises {info.bh}x{info.nq}x{info.nk} scores")


def _compute(call: Call) -> torch.Tensor:
    """Materialised attention in the compute dtype of the inputs (already upcast by the caller)."""
    q, k = call.q, call.k
    scores = torch.matmul(q, k.transpose(-2, -1)) * call.scale_value
    if call.bias is not None:
        scores = scores + call.bias.to(scores.dtype)
    mask = combine_masks(call.attn_mask, call.causal, q.shape[-2], k.shape[-2], q.device)
    a = attention_weights(scores, call.activation, mask)
    if call.dropout_p > 0.0:
        a = F.dropout(a, p=call.dropout_p, training=True)
    return torch.matmul(a, call.v)


run = backend_run(NAME, unsupported, _compute, flat=False)
reference_attention = run
