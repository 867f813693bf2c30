"""The readable definition of polyattn attention: materialise S and A, then A @ v.

Every other backend is tested against this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import Activation
from ..masking import combine_masks, valid_key_counts

__all__ = ["attention_weights", "reference_attention"]


def attention_weights(
    scores: torch.Tensor, activation: Activation, mask: torch.Tensor | None
) -> torch.Tensor:
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


def reference_attention(
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
    """Materialised attention in the compute dtype of the inputs (already upcast by the caller)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    mask = combine_masks(attn_mask, causal, q.shape[-2], k.shape[-2], q.device)
    a = attention_weights(scores, activation, mask)
    if dropout_p > 0.0:
        a = F.dropout(a, p=dropout_p, training=True)
    return torch.matmul(a, v)
