"""softmax through ``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention and friends).

polyattn's semantics on top of SDPA's: a row with nothing to attend outputs
zeros (SDPA's answer for such rows differs between kernels and versions, so
those rows are unmasked before the call and zeroed after it, which also keeps
NaN out of the gradients); ``bias`` and ``attn_mask`` may be given together;
``causal`` combines with a mask (SDPA takes one or the other, so the two are
merged into one (Nq, Nk) mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import Activation
from ..masking import combine_masks
from .common import BackendUnsupported, batch_shape

__all__ = ["sdpa_attention", "sdpa_unsupported_reason"]


def sdpa_unsupported_reason(activation: Activation) -> str | None:
    if not activation.is_softmax:
        return f"SDPA computes softmax only, not {activation.spec!r}"
    return None


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    activation: Activation,
    attn_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax attention by SDPA with polyattn's mask semantics."""
    reason = sdpa_unsupported_reason(activation)
    if reason is not None:
        raise BackendUnsupported(f"backend 'sdpa' cannot compute this call: {reason}; use backend='auto'")
    batch = batch_shape(q, k, v)
    q, k, v = (t if tuple(t.shape[:-2]) == batch else t.expand(*batch, *t.shape[-2:]) for t in (q, k, v))
    nq, nk = q.shape[-2], k.shape[-2]
    mask = attn_mask
    if causal and (mask is not None or bias is not None):
        mask = combine_masks(attn_mask, True, nq, nk, q.device)
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
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p, is_causal=causal, scale=scale
    )
    if has_any is not None:
        out = out.masked_fill(~has_any, 0.0)
    return out
