"""A small causal language model (decoder-only transformer) for token-level tasks such as MQAR.

Token and learned position embeddings, ``depth`` pre-norm blocks of causal :class:`PolyAttention`
and an MLP, a final norm and a linear head over the vocabulary: logits (B, T, vocab_size), where
position t sees tokens 0..t only (so N in ``/sqrt(N)`` and ``/N`` is t + 1 for row t).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.activations import ActivationLike
from ..core.layers import PolyAttention
from . import _tokens
from .registry import register_model

__all__ = ["CausalLM"]


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float, activation: ActivationLike) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PolyAttention(dim, num_heads, activation, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=True)
        return x + self.mlp(self.norm2(x))


class CausalLM(nn.Module):
    """tokens (B, T) long -> next-token logits (B, T, vocab_size), causal attention in every block."""

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        activation: ActivationLike = "softmax",
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 2,
        mlp_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        mlp_dim = 4 * dim if mlp_dim is None else mlp_dim
        _tokens.check_sizes(vocab_size, max_len, dim, depth, num_heads, mlp_dim, dropout)
        self.vocab_size, self.max_len = vocab_size, max_len
        self.token_embed, self.pos_embed = _tokens.embeddings(vocab_size, max_len, dim)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, mlp_dim, dropout, activation) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        fix = "build the model with a larger max_len (it follows data.seq_len in a config)"
        _tokens.check_tokens(tokens, self.max_len, "T", fix)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embed(tokens) + self.pos_embed(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@register_model("causal_lm")
def causal_lm(activation: str = "softmax", vocab_size: int = 256, max_len: int = 512, **overrides) -> CausalLM:
    """A decoder-only transformer (dim 64, 2 layers, 2 heads unless overridden) for token-level tasks."""
    return CausalLM(vocab_size, max_len, activation, **overrides)
