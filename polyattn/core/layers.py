"""``PolyAttention``: a multi-head attention layer whose activation is a spec string."""

from __future__ import annotations

import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import ActivationLike
from .functional import compute_dtype
from .masking import padding_to_attn_mask
from .module import AttentionModule

__all__ = ["PolyAttention"]


class PolyAttention(AttentionModule, nn.Module):
    """Multi-head attention on (B, N, dim) with a pluggable activation.

    Parameters are ``qkv`` (dim -> 3 dim) and ``proj`` (dim -> dim), as in timm's
    ViT ``Attention``; the activation is not part of the state dict, so a
    checkpoint loads under any activation and ``layer.activation = "x^3/sqrt(N)"``
    switches it in place. ``activation``, ``backend`` and ``attention_observers``
    are the attention-module protocol (:class:`polyattn.core.module.AttentionModule`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        activation: ActivationLike = "softmax",
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            # bool is an Integral too: PolyAttention(True, 1) is a mistake, not dim 1.
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        dim, num_heads = int(dim), int(num_heads)
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._init_attention(activation)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, {super().extra_repr()}"

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def project_qkv(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, heads, N, head_dim); k and v come from ``context`` when given."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}), got {tuple(x.shape)}")
        if context is None:
            qkv = self.qkv(x)
            if qkv.device.type == "cpu":
                # Every CPU backend computes in fp32 on (B*heads, N, d) blocks: one copy into that layout and
                # dtype here replaces three strided casts (under autocast) and three reshapes in the backend.
                b, n, _ = qkv.shape
                qkv = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
                cd = compute_dtype(qkv.dtype)
                # .to() with an unchanged dtype returns the strided view as it is.
                qkv = qkv.contiguous() if qkv.dtype == cd else qkv.to(cd, memory_format=torch.contiguous_format)
                q, k, v = qkv.unbind(0)
                return q, k, v
            q, k, v = qkv.chunk(3, dim=-1)
        else:
            if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.dim:
                raise ValueError(f"context must have shape ({x.shape[0]}, M, {self.dim}), got {tuple(context.shape)}")
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[: self.dim], None if b is None else b[: self.dim])
            k, v = F.linear(context, w[self.dim :], None if b is None else b[self.dim :]).chunk(2, dim=-1)
        return self._heads(q), self._heads(k), self._heads(v)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim).

        key_padding_mask: (B, M) bool, True = padding (M = N, or the context length).
        context: (B, M, dim) to attend to instead of x (cross-attention).
        """
        q, k, v = self.project_qkv(x, context)
        attn_mask = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (k.shape[0], k.shape[2]):
                raise ValueError(
                    f"key_padding_mask must have shape (B, N_keys) = {(k.shape[0], k.shape[2])}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            attn_mask = padding_to_attn_mask(key_padding_mask)
        out = self.attend(q, k, v, attn_mask=attn_mask, causal=causal, scale=self.scale)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.dim)
        return self.proj_drop(self.proj(out))
