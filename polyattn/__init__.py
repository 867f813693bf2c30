"""polyattn: softmax-free attention with scaled polynomial activations.

    >>> import torch, polyattn
    >>> q = k = v = torch.randn(2, 4, 128, 32)
    >>> out = polyattn.attention(q, k, v, activation="x^3/sqrt(N)")
"""

from .core import (
    Activation,
    PolyAttention,
    attention,
    causal_mask,
    get_activation,
    list_activations,
    padding_to_attn_mask,
    select_backend,
)

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "PolyAttention",
    "attention",
    "causal_mask",
    "get_activation",
    "list_activations",
    "padding_to_attn_mask",
    "select_backend",
]
