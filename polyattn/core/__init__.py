"""The attention core: activations, functional attention, backends, layers, diagnostics.

Nothing in this subpackage imports from the rest of polyattn.
"""

from .activations import Activation, get_activation, list_activations
from .backends import explain_backend, select_backend
from .decode import LinearState
from .diagnostics import AttentionMapRecorder, NormRecorder, attention_norms
from .functional import attention
from .layers import PolyAttention
from .masking import causal_mask, padding_to_attn_mask
from .module import AttentionModule, attention_modules, get_activations, set_activation
from .varlen import attention_varlen

__all__ = [
    "Activation",
    "AttentionMapRecorder",
    "AttentionModule",
    "LinearState",
    "NormRecorder",
    "PolyAttention",
    "attention",
    "attention_varlen",
    "attention_modules",
    "attention_norms",
    "causal_mask",
    "explain_backend",
    "get_activation",
    "get_activations",
    "list_activations",
    "padding_to_attn_mask",
    "select_backend",
    "set_activation",
]
