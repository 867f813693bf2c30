"""Attention backends: interchangeable implementations of :func:`polyattn.attention`.

``reference`` is the readable definition; every other backend must equal it in
values and gradients. ``select_backend`` says which one ``backend="auto"`` runs
and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..activations import Activation
from .reference import attention_weights, reference_attention

__all__ = [
    "BACKENDS",
    "BackendChoice",
    "attention_weights",
    "reference_attention",
    "select_backend",
]

BackendFn = Callable[..., torch.Tensor]

BACKENDS: dict[str, BackendFn] = {"reference": reference_attention}


@dataclass(frozen=True)
class BackendChoice:
    name: str
    reason: str


def select_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    activation: Activation,
    *,
    has_mask: bool = False,
    has_bias: bool = False,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> BackendChoice:
    """The backend ``backend="auto"`` would run for these inputs, with the reason."""
    return BackendChoice("reference", "the reference backend is the only one available")
