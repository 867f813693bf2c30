"""The attention core: activations, functional attention, backends, layers, diagnostics.

Nothing in this subpackage imports from the rest of polyattn.
"""

from .activations import Activation, get_activation, list_activations
from .backends import select_backend
from .functional import attention
from .layers import PolyAttention
from .masking import causal_mask, padding_to_attn_mask

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
