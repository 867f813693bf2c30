"""polyattn: softmax-free attention with scaled polynomial activations.

    >>> import torch, polyattn
    >>> q = k = v = torch.randn(2, 4, 128, 32)
    >>> out = polyattn.attention(q, k, v, activation="x^3/sqrt(N)")

The top level is the attention core (``polyattn.core``: activations, ``attention``,
``PolyAttention``, backends, diagnostics) plus ``patch`` for timm models and the model registry.
"""

from . import core
from .core import *  # noqa: F403  (the core's public names are the package's: one list, in core/__init__.py)
from .integrations import patch as patch
from .models import create_model as create_model
from .models import list_models as list_models
from .models import register_model as register_model

__version__ = "0.1.0"

__all__ = sorted([*core.__all__, "create_model", "list_models", "patch", "register_model"])
