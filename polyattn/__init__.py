"""polyattn: softmax-free attention with scaled polynomial activations.

    >>> import torch, polyattn
    >>> q = k = v = torch.randn(2, 4, 128, 32)
    >>> out = polyattn.attention(q, k, v, activation="x^3/sqrt(N)")
"""

from .core import (
    Activation,
    NormRecorder,
    PolyAttention,
    attention,
    attention_norms,
    causal_mask,
    explain_backend,
    get_activation,
    list_activations,
    padding_to_attn_mask,
    select_backend,
)
from .integrations import patch
from .models import create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "NormRecorder",
    "PolyAttention",
    "attention",
    "attention_norms",
    "causal_mask",
    "explain_backend",
    "create_model",
    "get_activation",
    "list_activations",
    "list_models",
    "padding_to_attn_mask",
    "patch",
    "register_model",
    "select_backend",
]
