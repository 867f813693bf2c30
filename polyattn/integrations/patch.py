"""``polyattn.patch(model, activation)``: switch the attention activation of a whole model.

Two kinds of attention module are handled:

* :class:`~polyattn.PolyAttention` (every polyattn model), and any other
  :class:`~polyattn.core.module.AttentionModule`: its ``activation`` is set.
* Third-party attention classes with a registered *patched subclass* (timm's
  ``Attention``, Swin's ``WindowAttention``, XCiT's ``XCA``, CaiT/XCiT's
  ``ClassAttn``; see :mod:`polyattn.integrations.timm`). Patching swaps the
  instance's class for the subclass, whose forward computes the same
  projections and hands the attention itself to :func:`polyattn.attention`.
  Parameters, buffers and state-dict keys are untouched, so checkpoints load
  across activations, and the patched module follows the attention-module
  protocol of :mod:`polyattn.core.module` (``activation``, ``backend``,
  ``attention_observers``), which :func:`polyattn.core.set_activation`,
  :class:`polyattn.NormRecorder`, the attention-map recorder and the
  benchmarks rely on.

Patching with ``softmax`` gives third-party modules their original class, and
so their own forward and fused kernels, back (``native_softmax=False`` keeps
the polyattn forward computing softmax instead, e.g. to record its norms).

Only exact classes are patched: a subclass may have changed the forward, and
computing it differently would silently change the model.
"""

from __future__ import annotations

import importlib
import re
import sys
import warnings
from collections import Counter

import torch
import torch.nn as nn

from ..core.activations import Activation, ActivationLike, get_activation
from ..core.backends.common import values_known
from ..core.module import AttentionModule

__all__ = [
    "MASKED_AT",
    "PatchedAttention",
    "additive_mask_to_bool",
    "patch",
    "patchable_classes",
    "register_attention_patch",
]

# original class -> patched subclass, and the reverse.
_PATCHES: dict[type, type] = {}
_ORIGINALS: dict[type, type] = {}

# Integrations registering patches, imported only once their library is in
# use (a model holding timm modules means timm is in sys.modules): patching a
# polyattn model never pays for importing timm.
_INTEGRATIONS: dict[str, str] = {"timm": "polyattn.integrations.timm"}

# Additive-mask entries at or below this are "masked" (softmax gives them weight 0 in
# fp32 already: exp(-1e4) underflows); a real bias never reaches it.
MASKED_AT = -1.0e4

# Class names that look like attention, for the error listing what a model holds.
_ATTENTION_NAME = re.compile(r"attn|attention|^xca$", re.IGNORECASE)


class PatchedAttention(AttentionModule):
    """Mixin of the patched third-party attention classes: the attention-module protocol
    (:class:`~polyattn.core.module.AttentionModule`: ``activation``, ``backend``,
    ``attention_observers``, and :meth:`attend`, the one place where a patched
    forward computes attention), added to an instance when :func:`patch` swaps
    its class in and removed when it swaps the original back.
    """

    def _drop_patch_state(self) -> None:
        for name in self._PROTOCOL_STATE:
            self.__dict__.pop(name, None)


def register_attention_patch(original: type, patched: type) -> None:
    """Register ``patched`` (a subclass of ``original`` and :class:`PatchedAttention`) as its replacement."""
    if not (isinstance(patched, type) and issubclass(patched, original) and issubclass(patched, PatchedAttention)):
        raise TypeError(
            f"{getattr(patched, '__name__', patched)!r} must subclass both {original.__name__} and PatchedAttention"
        )
    known = _PATCHES.get(original)
    if known is not None and known is not patched:
        raise ValueError(f"{original.__module__}.{original.__qualname__} already has a patch: {known.__qualname__}")
    _PATCHES[original] = patched
    _ORIGINALS[patched] = original


def _load_integrations() -> None:
    for library, module in _INTEGRATIONS.items():
        if sys.modules.get(library) is not None:
            importlib.import_module(module)


def patchable_classes() -> list[str]:
    """Qualified names of the attention classes :func:`patch` handles (with the libraries in use)."""
    _load_integrations()
    names = ["polyattn.PolyAttention"]
    names += [f"{c.__module__}.{c.__qualname__}" for c in _PATCHES]
    return names


def additive_mask_to_bool(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split an SDPA-style ``attn_mask`` into polyattn's ``(attn_mask, bias)``.

    A bool mask (True = may attend) is returned as it is. In a float (additive)
    mask, entries at or below ``MASKED_AT`` (-1e4: ``-inf``, ``-1e9``,
    ``finfo.min``, the usual ways of writing "masked" for softmax) are masking,
    exactly 0 in A after phi and left out of N; the other entries are an
    additive bias applied before phi.
    """
    if mask is None or mask.dtype == torch.bool:
        return mask, None
    if not mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = may attend) or an additive float mask, got {mask.dtype}")
    blocked = mask <= MASKED_AT
    if not values_known(mask):
        # No values to inspect (torch.compile, meta, fake): keep both parts.
        # An all-True mask and an all-zero bias give the same result as None.
        return ~blocked, mask.masked_fill(blocked, 0.0)
    if not bool(blocked.any()):
        return None, mask if bool(mask.any()) else None
    bias = mask.masked_fill(blocked, 0.0)
    return ~blocked, bias if bool(bias.any()) else None


def _attention_like(model: nn.Module) -> Counter:
    """Class names of the modules that look like attention: by name, or subclassing a supported class."""
    supported = tuple(_PATCHES) + (AttentionModule,)
    return Counter(
        type(m).__name__
        for m in model.modules()
        if _ATTENTION_NAME.search(type(m).__name__) or isinstance(m, supported)
    )


def _no_attention_error(model: nn.Module) -> ValueError:
    found = _attention_like(model)
    listed = ", ".join(f"{name} (x{n})" for name, n in sorted(found.items())) or "none"
    hint = ""
    if sys.modules.get("timm") is None:
        hint = " (timm classes are handled once timm is installed and imported)"
    return ValueError(
        f"{type(model).__name__} has no attention module polyattn can patch. Attention-like classes found: "
        f"{listed}. Supported: {', '.join(patchable_classes())}{hint}; subclasses of these are not patched "
        "because their forward may differ."
    )


def patch(model: nn.Module, activation: ActivationLike, *, native_softmax: bool = True) -> int:
    """Set the attention activation of every supported attention module in ``model``.

    ``activation`` is a spec string (``"x^3/sqrt(N)"``, ``"x/14"``, ``"softmax"``...).
    Returns the number of attention modules now computing with it. Patching
    again with another activation works; with ``softmax`` (and
    ``native_softmax=True``) third-party modules get their original forward
    back, bit for bit. ``native_softmax=False`` keeps them on
    :func:`polyattn.attention`, where observers such as
    :class:`polyattn.NormRecorder` see them (outputs agree to float rounding).

    Raises ValueError naming the attention-like classes found when the model
    holds no supported attention module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    act = get_activation(activation)
    _load_integrations()
    restore = act.is_softmax and native_softmax
    handled: list[nn.Module] = []
    for module in model.modules():
        cls = type(module)
        if cls in _ORIGINALS:  # patched already
            if restore:
                module._drop_patch_state()
                module.__class__ = _ORIGINALS[cls]
            else:
                module.activation = act
        elif isinstance(module, AttentionModule):  # PolyAttention: polyattn's own forward at any activation
            module.activation = act
        elif cls in _PATCHES:
            if not restore:
                module.__class__ = _PATCHES[cls]
                module._init_attention(act)
        else:
            continue
        handled.append(module)
    if not handled:
        raise _no_attention_error(model)
    if not act.is_softmax:
        _warn_left_alone(model, handled, act)
    return len(handled)


def _warn_left_alone(model: nn.Module, handled: list[nn.Module], act: Activation) -> None:
    """Warn about attention-like modules that keep their own (softmax) attention.

    A model mixing supported and unsupported attention (CaiT's talking-heads
    layers beside its class attention) would otherwise be only partly switched.
    Containers of handled modules (blocks named ``...AttentionBlock``) are not
    attention themselves and are skipped.
    """
    ids = {id(m) for m in handled}
    supported = tuple(_PATCHES) + (AttentionModule,)
    left = Counter(
        type(m).__name__
        for m in model.modules()
        if id(m) not in ids
        and (_ATTENTION_NAME.search(type(m).__name__) or isinstance(m, supported))
        and not any(id(sub) in ids for sub in m.modules())
    )
    if left:
        listed = ", ".join(f"{name} (x{n})" for name, n in sorted(left.items()))
        warnings.warn(
            f"polyattn.patch set {len(handled)} attention modules to {act.spec!r} but left these as they were "
            f"(not supported, so still their own attention): {listed}",
            stacklevel=3,
        )
