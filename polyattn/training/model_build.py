"""The model a config builds: its keyword arguments (the config's and the data's), and init_from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data.registry import DataBundle
from ..models.registry import create_model
from .checkpoint import CHECKPOINT
from .config import ConfigError

__all__ = ["model_kwargs", "build_model", "init_from"]


def _same(a: Any, b: Any) -> bool:
    def norm(v):
        if isinstance(v, (list, tuple)):
            return tuple(v)
        return v

    na, nb = norm(a), norm(b)
    # img_size 32 and [32, 32] describe the same square image.
    if isinstance(na, tuple) and not isinstance(nb, tuple):
        nb = (nb, nb)
    if isinstance(nb, tuple) and not isinstance(na, tuple):
        na = (na, na)
    return na == nb


def model_kwargs(cfg: dict, bundle: DataBundle) -> dict:
    """model.overrides plus what the data dictates (image size, channels, classes); conflicts are errors."""
    kwargs = dict(cfg["model"]["overrides"])
    for key, value in bundle.model_overrides.items():
        if key in kwargs and not _same(kwargs[key], value):
            hint = " (set data.image_size to resize the data instead)" if key == "img_size" else ""
            raise ConfigError(
                f"model.overrides.{key}={kwargs[key]!r} conflicts with the data: dataset "
                f"{cfg['data']['name']!r} gives {key}={value!r}{hint}"
            )
        kwargs[key] = value
    return kwargs


def build_model(name: str, activation: str, kwargs: dict) -> nn.Module:
    """create_model with errors worded in config terms."""
    try:
        return create_model(name, activation=activation, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build model {name!r} with model.overrides {kwargs}: {e}") from None


def init_from(model: nn.Module, source: str, log: Callable[[str], None]) -> None:
    """Load weights from a checkpoint file or run directory; a differently shaped head is skipped."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"model.init_from: no checkpoint at {path} (give a .pt file or a run directory)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and k != "pos_embed" and v.shape != own[k].shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    log(
        f"init_from {path}: loaded {len(state)} tensors; skipped (shape differs) {skipped or 'none'}; "
        f"missing {list(missing) or 'none'}; unexpected {list(unexpected) or 'none'}"
    )
