"""PINN run configs: the shared config system (typed keys, inherit, --set, did-you-mean) with PINN sections.

    cfg = resolve_pinn_config("configs/pinn/quick.yaml", ["train.seed=1"], point="wave_x3")

Layers, later winning: the defaults (the published set-up), the preset (``paper`` or
``quick``), the file, the overrides.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ...training.config import (
    ConfigError,
    ConfigSchema,
    Key,
    at_least,
    canonical_activation,
    greater_than,
    parse_override,
    positive_int,
)
from ..pdes import PDES, get_pde

__all__ = ["PINN_CONFIG", "PRESETS", "parse_set", "resolve_pinn_config", "validate_pinn_config"]


def _is_grid(v: Any) -> bool:
    return len(v) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in v)


# The published set-up (PINNsFormer demos): 51 x 51 training grid, 101 x 101 test
# grid, k = 5, dt = 1e-4, 453k-parameter transformer, L-BFGS. The published demos
# run 500 L-BFGS steps for convection and reaction and 1000 for the wave; their
# MLP baseline trains on a 101 x 101 grid (configs/pinn/paper.yaml sets these).
# Resume rules: a resume may train longer (max_steps) and log, checkpoint or thread differently;
# everything else chose the problem, the model or the optimizer's path so far.
_SECTIONS: dict[str, dict[str, Key]] = {
    "pde": {
        "name": Key("convection", "str", choices=tuple(PDES), resume="fixed"),
        "params": Key({}, "dict", resume="fixed"),
    },
    "model": {
        "name": Key("pinnsformer", "str", choices=("pinnsformer", "mlp"), resume="fixed"),
        "activation": Key("softmax", "str", resume="fixed"),
        "d_model": positive_int(32, "fixed"),
        "d_ff": positive_int(256, "fixed"),
        "d_hidden": positive_int(512, "fixed"),
        "num_layers": positive_int(1, "fixed"),
        "num_heads": positive_int(2, "fixed"),
        "seq_len": positive_int(5, "fixed"),
        "seq_step": Key(1.0e-4, "float", check=greater_than(0), requirement="> 0", resume="fixed"),
        "mlp_hidden": positive_int(512, "fixed"),
        "mlp_layers": Key(4, "int", check=at_least(2), requirement=">= 2", resume="fixed"),
    },
    "data": {
        "train_grid": Key(
            [51, 51], "list", check=_is_grid, requirement="[n_x, n_t] with integers >= 2", resume="fixed"
        ),
        "test_grid": Key(
            [101, 101], "list", check=_is_grid, requirement="[n_x, n_t] with integers >= 2", resume="fixed"
        ),
    },
    "train": {
        "optimizer": Key("lbfgs", "str", choices=("lbfgs", "adam"), resume="fixed"),
        "max_steps": Key(500, "int", check=at_least(0), requirement=">= 0", resume="applied"),
        # None: 1.0 for L-BFGS, 1e-3 for Adam
        "lr": Key(None, "float", nullable=True, check=greater_than(0), requirement="> 0 or null", resume="fixed"),
        "lbfgs_max_iter": positive_int(20, "fixed"),
        "lbfgs_history": positive_int(100, "fixed"),
        "seed": Key(0, "int", check=at_least(0), requirement=">= 0", resume="fixed"),
        "log_every": positive_int(1, "free"),
        "checkpoint_every": positive_int(50, "free"),
        # torch CPU threads; None leaves torch's default
        "num_threads": positive_int(None, "free", nullable=True),
    },
}

# Layers between the defaults and the file. "quick" fits the CPU budget of a 2-core
# machine (each run under 5 minutes, measured: see docs/pinn.md): a 17 x 17
# training grid, the published architecture with narrower feed-forward and
# output widths, and 20 L-BFGS steps (of up to 20 iterations each).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": {
        "data": {"train_grid": [17, 17]},
        "model": {"d_ff": 64, "d_hidden": 128, "mlp_hidden": 128},
        "train": {"max_steps": 20, "checkpoint_every": 5, "num_threads": 1},
    },
}


def validate_pinn_config(cfg: dict) -> None:
    """The checks across keys: PDE parameters, the activation spec, heads dividing the width."""
    try:
        get_pde(cfg["pde"]["name"], cfg["pde"]["params"])
    except ValueError as e:
        raise ConfigError(f"pde.params: {e}") from None
    m = cfg["model"]
    canonical_activation(m)
    if m["d_model"] % m["num_heads"]:
        raise ConfigError(f"model.d_model ({m['d_model']}) must be divisible by model.num_heads ({m['num_heads']})")


PINN_CONFIG = ConfigSchema(
    "PINN config",
    _SECTIONS,
    presets=PRESETS,
    check=validate_pinn_config,
    renamed={"train.steps": "train.max_steps", "train.threads": "train.num_threads"},
)


def resolve_pinn_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    quick: bool = False,
    point: str | None = None,
) -> dict:
    """The full config of a PINN run; ``quick=True`` selects the ``quick`` preset whatever the file says.

    ``overrides``: ``{"model.activation": "x^3/sqrt(N)"}`` or ``["model.activation=x^3/sqrt(N)"]``.
    ``point`` picks one run of a grid file (configs/pinn/quick.yaml, paper.yaml).
    Unknown keys and bad values raise ConfigError (a ValueError) naming the key and what is allowed.
    """
    return PINN_CONFIG.load(path, overrides or (), preset="quick" if quick else None, point=point)


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """["train.max_steps=10", "pde.params.beta=30"] -> {"train.max_steps": 10, ...} (values parsed as YAML)."""
    return {".".join(parts): value for parts, value in map(parse_override, items)}
