"""Model registry: ``create_model(name, activation=..., **overrides)``.

A model builder is a function ``fn(activation: str = "softmax", **overrides) -> nn.Module``
registered under a name with ``@register_model(name)``. Names starting with
``timm:`` are handed to ``polyattn.integrations.timm.create_timm_model``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch.nn as nn

from ..core.activations import get_activation

__all__ = ["create_model", "list_models", "register_model", "TIMM_PREFIX"]

TIMM_PREFIX = "timm:"

ModelBuilder = Callable[..., nn.Module]

_MODELS: dict[str, ModelBuilder] = {}

# Modules whose import registers models. Imported on first lookup so that
# ``polyattn.models`` does not depend on them at import time.
_PROVIDERS: tuple[str, ...] = ("polyattn.models.vit",)
_providers_loaded = False


def _load_providers() -> None:
    global _providers_loaded
    if _providers_loaded:
        return
    _providers_loaded = True
    for module in _PROVIDERS:
        importlib.import_module(module)


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``fn(activation="softmax", **overrides) -> nn.Module`` as ``name``."""
    if not isinstance(name, str) or not name or name.startswith(TIMM_PREFIX):
        raise ValueError(
            f"model name must be a non-empty string not starting with {TIMM_PREFIX!r}, got {name!r}"
        )

    def decorator(fn: ModelBuilder) -> ModelBuilder:
        if name in _MODELS and _MODELS[name] is not fn:
            raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__module__})")
        _MODELS[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted (``timm:<name>`` models are not listed)."""
    _load_providers()
    return sorted(_MODELS)


def is_known_model(name: str) -> bool:
    """True when ``create_model(name)`` would find a builder (any ``timm:`` name counts)."""
    _load_providers()
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
    _load_providers()
    if name not in _MODELS:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(sorted(_MODELS))} "
            f"(or '{TIMM_PREFIX}<timm model name>')"
        )
    return _MODELS[name](activation=spec, **overrides)
