"""Mixup / CutMix and the weight EMA: what the trainer does to a batch's inputs and targets, and to its weights.

``mix_batch`` is the built-in Mixup/CutMix; ``timm_mixup`` is timm's (``train.mixup_impl=timm``),
whose soft targets carry the label smoothing. ``make_ema`` is timm's ModelEmaV3, or ``PlainEma``
with the same update when timm is not installed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.registry import DataBundle
from .config import ConfigError

__all__ = ["mix_batch", "timm_mixup", "apply_mixup", "make_mixer", "mixed_batch", "PlainEma", "make_ema"]


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float, cutmix: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (alpha ``mixup``) or CutMix (alpha ``cutmix``; half the batches when both are on).

    Returns the mixed images and soft targets (B, num_classes).
    """
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(()) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device="cpu").to(x.device)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1.0 - lam) * x[perm]
    one_hot = F.one_hot(y, num_classes).float()
    return x, lam * one_hot + (1.0 - lam) * one_hot[perm]


def timm_mixup(mixup: float, cutmix: float, label_smoothing: float, num_classes: int):
    """``timm.data.Mixup`` (per-batch mode, switch probability 0.5 as in mix_batch); its soft targets
    carry the label smoothing, so the loss must not smooth again. Draws from numpy's global RNG.
    None when timm is not installed."""
    try:
        from timm.data import Mixup
    except ImportError:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)


def apply_mixup(mixer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mixer(x, y)``; timm's Mixup wants an even batch, so an odd one (a short last batch, a
    rank's share) is padded with a copy of its last example, which is dropped again afterwards."""
    n = x.shape[0]
    if n % 2 == 0:
        return mixer(x, y)
    xm, t = mixer(torch.cat([x, x[-1:]]), torch.cat([y, y[-1:]]))
    return xm[:n], t[:n]


class PlainEma:
    """Fallback for ``timm.utils.ModelEmaV3`` without timm, for float32 weights the same update:
    ``ema = ema.lerp(weight, 1 - decay)`` for floating tensors of the state dict, a copy for the rest."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if e.is_floating_point():
                e.lerp_(m.to(e.dtype), 1.0 - self.decay)
            else:
                e.copy_(m)


def make_mixer(tc: dict, bundle: DataBundle, log: Callable[[str], None]) -> Any:
    """timm's Mixup for ``train.mixup_impl=timm``, or None (mix_batch, or no mixing).

    Refuses mixing on data other than float images with one class label each.
    """
    if tc["mixup"] <= 0 and tc["cutmix"] <= 0:
        return None
    x0, y0 = bundle.train[0]
    if not (isinstance(x0, torch.Tensor) and x0.is_floating_point() and torch.as_tensor(y0).dim() == 0):
        raise ConfigError(
            "train.mixup / train.cutmix need float image tensors with one class label each; this dataset "
            "yields other examples (tokens, dicts or per-token labels): set them to 0"
        )
    if tc["mixup_impl"] != "timm":
        return None
    mixer = timm_mixup(tc["mixup"], tc["cutmix"], tc["label_smoothing"], bundle.num_classes)
    if mixer is None:
        log("train.mixup_impl=timm: timm is not installed (pip install polyattn[timm]); using mix_batch")
    return mixer


def mixed_batch(mixer: Any, x: Any, y: torch.Tensor, tc: dict, num_classes: int) -> tuple[Any, torch.Tensor, float]:
    """(inputs, targets, label smoothing) of one training batch after the configured mixing."""
    if mixer is not None:
        x, target = apply_mixup(mixer, x, y)
        return x, target, 0.0  # the smoothing is already in timm's soft targets
    if tc["mixup"] > 0 or tc["cutmix"] > 0:
        x, target = mix_batch(x, y, num_classes, tc["mixup"], tc["cutmix"])
        return x, target, tc["label_smoothing"]
    return x, y, tc["label_smoothing"]


def make_ema(model: nn.Module, tc: dict, log: Callable[[str], None]) -> Any:
    """timm's ModelEmaV3 of the model (a copy updated after every optimizer step), or None."""
    decay = tc["ema_decay"]
    if decay <= 0:
        return None
    if tc["select"] == "best_val":
        raise ConfigError("train.ema_decay > 0 with train.select=best_val is not supported; use select=last")
    try:
        from timm.utils import ModelEmaV3
    except ImportError:
        log("train.ema_decay: timm is not installed (pip install polyattn[timm]); using PlainEma")
        return PlainEma(model, decay)
    return ModelEmaV3(model, decay=decay)
