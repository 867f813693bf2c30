"""Model registry: ``create_model(name, activation=..., **overrides)``.

A model builder is a function ``fn(activation: str = "softmax", **overrides) -> nn.Module``
registered under a name with ``@register_model(name)``. Names starting with
``timm:`` are handed to ``polyattn.integrations.timm.create_timm_model``.

The built-in builders register when ``polyattn.models`` imports ``vit`` and ``lra``,
which happens before this module can be imported at all.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch.nn as nn

from ..core.activations import get_activation
from ..utils.registry import Registry

__all__ = ["create_model", "is_known_model", "list_models", "register_model", "TIMM_PREFIX"]

TIMM_PREFIX = "timm:"

ModelBuilder = Callable[..., nn.Module]

_MODELS: Registry[ModelBuilder] = Registry("model", hint=f"(or '{TIMM_PREFIX}<timm model name>')")


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``fn(activation="softmax", **overrides) -> nn.Module`` as ``name``."""
    # The prefix is reserved: a registered "timm:x" could never be reached, create_model routes it to timm.
    if not isinstance(name, str) or not name or name.startswith(TIMM_PREFIX):
        raise ValueError(f"model name must be a non-empty string not starting with {TIMM_PREFIX!r}, got {name!r}")
    return _MODELS.register(name)


def list_models() -> list[str]:
    """Registered model names, sorted (``timm:<name>`` models are not listed)."""
    return _MODELS.names()


def is_known_model(name: str) -> bool:
    """True when ``create_model(name)`` would find a builder (any ``timm:`` name counts)."""
    return name in _MODELS or (isinstance(name, str) and name.startswith(TIMM_PREFIX))


def create_model(name: str, activation: str = "softmax", **overrides) -> nn.Module:
    """Build the model registered as ``name`` with attention activation ``activation``.

    ``overrides`` go to the builder (for the ViTs: img_size, patch_size, in_chans,
    num_classes, depth, dim, drop_path_rate, ...). ``timm:<name>`` builds a timm
    model with PolyAttention swapped in.
    """
    spec = get_activation(activation).spec  # fails early with the list of accepted forms
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        try:
            timm_integration = importlib.import_module("polyattn.integrations.timm")
        except ImportError as e:
            raise ImportError(
                f"model {name!r} needs the timm integration (polyattn.integrations.timm) and timm: "
                f"pip install 'polyattn[timm]' ({e})"
            ) from e
        return timm_integration.create_timm_model(name[len(TIMM_PREFIX) :], activation=spec, **overrides)
    return _MODELS.get(name)(activation=spec, **overrides)
