"""The attention-module protocol, and switching the activation of a whole model.

An *attention module* has

* ``activation``: an :class:`~polyattn.Activation`, settable by spec string
  (``m.activation = "x^3/sqrt(N)"``); it is not part of the state dict, so a
  checkpoint loads under any activation;
* ``backend``: the backend name handed to :func:`polyattn.attention`
  (``"auto"`` unless set);
* ``attention_observers``: callables ``fn(module, q, k, attn_mask, bias,
  causal, scale)`` called with the inputs of each attention before it is
  computed (:class:`~polyattn.NormRecorder`, :class:`AttentionMapRecorder`).

:class:`AttentionModule` implements it once: :class:`~polyattn.PolyAttention`
(every polyattn model) and the patched third-party classes of
:mod:`polyattn.integrations` subclass it, and their forwards hand the attention
itself to :meth:`AttentionModule.attend`. :func:`attention_modules`,
:func:`set_activation` and :func:`get_activations` work on any model holding
such modules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .activations import Activation, ActivationLike, get_activation
from .functional import attention, autocast_off

__all__ = [
    "AttentionModule",
    "AttentionObserver",
    "attention_modules",
    "get_activations",
    "is_attention_module",
    "module_activation",
    "set_activation",
]

# fn(module, q, k, attn_mask, bias, causal, scale)
AttentionObserver = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool, float | None], None
]


class AttentionModule:
    """Mixin giving an ``nn.Module`` the attention-module protocol.

    Put it before the ``nn.Module`` base (``class MyAttention(AttentionModule,
    nn.Module)``), call :meth:`_init_attention` once the module is built, and
    compute the attention with :meth:`attend` in the forward.
    """

    _activation: Activation
    backend: str
    attention_observers: list[AttentionObserver]

    # The instance attributes the protocol adds; undoing a patch removes exactly these.
    _PROTOCOL_STATE = ("_activation", "backend", "attention_observers")

    def _init_attention(self, activation: ActivationLike) -> None:
        self.activation = activation  # type: ignore[assignment]  # parsed by the setter
        self.backend = "auto"
        # A plain list rather than forward hooks: an empty list costs one truth test per call.
        self.attention_observers = []

    @property
    def activation(self) -> Activation:
        return self._activation

    @activation.setter
    def activation(self, spec: ActivationLike) -> None:
        self._activation = get_activation(spec)

    def _attn_dropout_p(self) -> float:
        if not self.training:  # type: ignore[attr-defined]
            return 0.0
        # PolyAttention keeps a float, third-party modules an nn.Dropout.
        drop = getattr(self, "attn_drop", 0.0)
        return float(drop.p) if isinstance(drop, nn.Dropout) else float(drop)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        causal: bool = False,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Tell the observers, then :func:`polyattn.attention` with this module's activation, backend and dropout."""
        if q.dtype != v.dtype or k.dtype != v.dtype:
            # Under autocast, norms (qk-norm, XCA's L2 normalisation) return fp32 while the
            # projections return bf16/fp16; SDPA in timm's own forward would cast them all to
            # the autocast dtype, which is v's. polyattn.attention still computes in fp32.
            q, k = q.to(v.dtype), k.to(v.dtype)
        if self.attention_observers:
            # Observers measure in fp32, as the attention computes; autocast would make their matmuls bf16.
            with autocast_off(q.device.type):
                for observe in self.attention_observers:
                    observe(self, q, k, attn_mask, bias, causal, scale)  # type: ignore[arg-type]
        return attention(
            q,
            k,
            v,
            self._activation,
            attn_mask=attn_mask,
            bias=bias,
            causal=causal,
            scale=scale,
            dropout_p=self._attn_dropout_p(),
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        own = f"activation={self._activation.spec!r}"
        return f"{base}, {own}" if base else own


def is_attention_module(module: nn.Module) -> bool:
    """Whether ``module`` follows the protocol: an :class:`AttentionModule`, or any module with an
    ``attention_observers`` list and an ``activation`` (or ``_activation``) attribute."""
    if isinstance(module, AttentionModule):
        return True
    has_activation = hasattr(module, "_activation") or hasattr(module, "activation")
    return isinstance(getattr(module, "attention_observers", None), list) and has_activation


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attention module in ``model``, in ``model.modules()`` order.

    The position in this list is the 0-based *layer* index used by the recorders.
    Third-party attention (timm) counts once :func:`polyattn.patch` has patched it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if is_attention_module(m)]


def module_activation(module: nn.Module) -> Activation:
    """The parsed activation of an attention module (duck-typed modules may hold a spec string)."""
    act = getattr(module, "activation", None)
    if act is None:
        act = module._activation
    return get_activation(act)


def _no_attention_error(model: nn.Module) -> ValueError:
    return ValueError(
        f"{type(model).__name__} holds no polyattn attention module (PolyAttention, or third-party attention "
        "patched by polyattn.patch): patch timm models with polyattn.patch(model, spec) first"
    )


def set_activation(model: nn.Module, spec: ActivationLike) -> int:
    """Set the activation of every attention module in ``model``; returns how many were set.

    Works on any model whose attention follows the protocol: polyattn's ViT,
    LRA encoders and PINNsFormer, a timm model after :func:`polyattn.patch`.
    Module classes never change here, so patched third-party modules stay on
    :func:`polyattn.attention` even for ``"softmax"`` (``polyattn.patch(model,
    "softmax")`` gives them their own forward back). The spec is parsed before
    anything is set: a bad spec leaves the model as it was.
    """
    act = get_activation(spec)
    modules = attention_modules(model)
    if not modules:
        raise _no_attention_error(model)
    for _, m in modules:
        m.activation = act
    return len(modules)


def get_activations(model: nn.Module) -> dict[str, str]:
    """Module name -> activation spec of every attention module in ``model`` (empty when there is none)."""
    return {name: module_activation(m).spec for name, m in attention_modules(model)}
