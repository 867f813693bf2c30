"""timm integration: polynomial attention in timm's ViT, DeiT, Swin, XCiT and CaiT models.

Importing this module registers a patched subclass for each supported timm
attention class (see :func:`polyattn.patch`); what each hands to
:func:`polyattn.attention`:

- ``timm.layers.Attention`` (ViT, DeiT and every model built on it): q, k
  after ``q_norm``/``k_norm``, v; timm's ``attn_mask`` (bool, or additive
  float whose entries <= -1e4 mean masked) and ``is_causal``; ``attn_drop`` as dropout.
- Swin's ``WindowAttention``: the relative-position bias as ``bias`` (added
  before phi); the shifted-window 0/-100 mask as a bool mask.
- XCiT's ``XCA``: channels attend to channels: L2-normalised q, k of shape
  (d_h, tokens) per head, q times the learned temperature, scale 1.
- ``ClassAttn`` (CaiT, XCiT): the class token's query against all tokens.

Everything around the attention (projections, qk-norm, gating, dropout,
output projection) is timm's own computation, in timm's order.

:func:`create_timm_model` builds any timm model from scratch (never downloads
weights) and patches it; ``polyattn.create_model("timm:<name>")`` and
``polyattn train --set model.name=timm:<name>`` call it.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import timm
    from timm.layers import Attention as _TimmAttention
    from timm.models.cait import ClassAttn as _TimmClassAttn
    from timm.models.swin_transformer import WindowAttention as _TimmWindowAttention
    from timm.models.xcit import XCA as _TimmXCA
except ImportError as e:  # pragma: no cover - exercised only without timm
    raise ImportError(f"polyattn's timm integration needs timm: pip install 'polyattn[timm]' ({e})") from e

from ..core.activations import ActivationLike, get_activation
from .patch import PatchedAttention, additive_mask_to_bool, patch, register_attention_patch

__all__ = [
    "PolyClassAttn",
    "PolyTimmAttention",
    "PolyWindowAttention",
    "PolyXCA",
    "create_timm_model",
]


class PolyTimmAttention(PatchedAttention, _TimmAttention):
    """timm ``Attention`` (ViT, DeiT, ...) computing through :func:`polyattn.attention`."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        attn_dim = getattr(self, "attn_dim", self.num_heads * self.head_dim)
        gate_layer = getattr(self, "gate", None)
        gate = gate_layer(x).sigmoid() if gate_layer is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        mask, bias = additive_mask_to_bool(attn_mask)
        out = self.attend(q, k, v, attn_mask=mask, bias=bias, causal=is_causal, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n, attn_dim)
        norm = getattr(self, "norm", None)
        if norm is not None:
            out = norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class PolyWindowAttention(PatchedAttention, _TimmWindowAttention):
    """Swin ``WindowAttention`` computing through :func:`polyattn.attention`.

    The relative-position bias stays an additive bias before phi. Swin's
    shifted-window mask (num_windows, N, N) holds 0 for token pairs from the
    same image region and -100 across regions; it becomes a bool mask
    (0 = may attend), so cross-region entries of A are exactly 0 and the
    dynamic N of ``/sqrt(N)`` and ``/N`` counts the keys of the query's own
    region.
    """

    def _relative_position_bias(self, n: int) -> torch.Tensor:
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b_, n, _ = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn_mask = None
        if mask is not None:
            # x holds the windows of each image in turn: window w of image i is row i * nW + w.
            num_win = mask.shape[0]
            allowed = mask == 0
            attn_mask = allowed.view(1, num_win, 1, n, n).expand(b_ // num_win, -1, -1, -1, -1).reshape(b_, 1, n, n)
        out = self.attend(q, k, v, attn_mask=attn_mask, bias=self._relative_position_bias(n), scale=self.scale)
        out = out.transpose(1, 2).reshape(b_, n, -1)
        return self.proj_drop(self.proj(out))


class PolyXCA(PatchedAttention, _TimmXCA):
    """XCiT's cross-covariance attention computing through :func:`polyattn.attention`.

    Per head, q and k are (d_h, tokens) after the transpose: the attention
    matrix is d_h x d_h (channels attend to channels), its entries are cosine
    similarities times the learned per-head temperature (scale 1). So the N of
    ``/sqrt(N)`` and ``/N`` is d_h, the channels per head (48 in XCiT-S12, 64
    in XCiT-M24), not the number of tokens; the observers see q, k as
    (B, heads, d_h, tokens).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)  # (B, heads, d_h, tokens)
        q = F.normalize(q, dim=-1) * self.temperature
        k = F.normalize(k, dim=-1)
        out = self.attend(q, k, v, scale=1.0)
        out = out.permute(0, 3, 1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class PolyClassAttn(PatchedAttention, _TimmClassAttn):
    """CaiT/XCiT class attention (the class token attends to all tokens) through :func:`polyattn.attention`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        hd = c // self.num_heads
        q = self.q(x[:, 0]).reshape(b, 1, self.num_heads, hd).permute(0, 2, 1, 3)
        k = self.k(x).reshape(b, n, self.num_heads, hd).permute(0, 2, 1, 3)
        v = self.v(x).reshape(b, n, self.num_heads, hd).permute(0, 2, 1, 3)
        out = self.attend(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, 1, c)
        return self.proj_drop(self.proj(out))


register_attention_patch(_TimmAttention, PolyTimmAttention)
register_attention_patch(_TimmWindowAttention, PolyWindowAttention)
register_attention_patch(_TimmXCA, PolyXCA)
register_attention_patch(_TimmClassAttn, PolyClassAttn)


def create_timm_model(name: str, activation: ActivationLike = "softmax", **overrides: Any) -> nn.Module:
    """Build timm model ``name`` from scratch and give its attention ``activation``.

    ``overrides`` go to ``timm.create_model`` (``num_classes``, ``img_size``,
    ``in_chans``, ``patch_size``, ``window_size``, ``drop_path_rate``...);
    pretrained weights are never downloaded. Every activation, softmax
    included, runs through :func:`polyattn.attention` so that runs are
    computed the same way and :class:`polyattn.NormRecorder` can record any of
    them.
    """
    act = get_activation(activation)
    if not isinstance(name, str) or not name:
        raise ValueError(f"timm model name must be a non-empty string, got {name!r}")
    if "pretrained" in overrides:
        raise ValueError(
            "pretrained is not an override of timm models in polyattn: nothing is downloaded; "
            "load weights with model.init_from=PATH instead"
        )
    if not timm.is_model(name):
        # Rank names of the same family (first word) by similarity: 'vit_tinyy' -> vit_tiny_patch16_224.
        family = name.split("_")[0]
        pool = [m for m in timm.list_models() if m.split("_")[0] == family]
        close = difflib.get_close_matches(name, pool or timm.list_models(), n=8, cutoff=0.3 if pool else 0.6)
        raise ValueError(
            f"unknown timm model {name!r}"
            + (f"; similar names: {', '.join(close)}" if close else "")
            + " (timm.list_models() lists them all)"
        )
    try:
        model = timm.create_model(name, pretrained=False, **overrides)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ValueError(
            f"timm could not build {name!r} with overrides {overrides}: {e or type(e).__name__}. Small images "
            "need a smaller patch_size (ViT, DeiT, XCiT: 8 or 16 for XCiT) or window_size (Swin)"
        ) from e
    patch(model, act, native_softmax=False)
    return model
