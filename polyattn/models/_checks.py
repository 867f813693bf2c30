"""Argument checks shared by the model constructors.

Each raises ValueError naming the constructor argument, so that a bad
``model.overrides`` value surfaces as one config error (the trainer turns
create_model's ValueError into a ConfigError) instead of a ZeroDivisionError or
a shape error deep inside torch.
"""

from __future__ import annotations

import math
from typing import Any


def positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def probability(name: str, value: Any) -> None:
    """A dropout-style rate in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def heads(dim_name: str, dim: int, num_heads: Any) -> None:
    """num_heads is a positive int dividing the width ``dim`` (already checked positive)."""
    positive_int("num_heads", num_heads)
    if dim % num_heads:
        raise ValueError(f"{dim_name} ({dim}) must be divisible by num_heads ({num_heads})")
