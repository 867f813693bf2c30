"""What the token models (CausalLM, the LRA encoder) share: their size checks, the token and learned
position embeddings, and the check of a batch of token ids."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import _checks


def check_sizes(
    vocab_size: int, max_len: int, dim: int, depth: int, num_heads: int, mlp_dim: int, dropout: float
) -> None:
    for name, value in (("vocab_size", vocab_size), ("max_len", max_len), ("dim", dim), ("depth", depth)):
        _checks.positive_int(name, value)
    _checks.heads("dim", dim, num_heads)
    _checks.positive_int("mlp_dim", mlp_dim)
    _checks.probability("dropout", dropout)


def embeddings(vocab_size: int, max_len: int, dim: int) -> tuple[nn.Embedding, nn.Embedding]:
    """(token, position) embeddings, initialised N(0, 0.02^2) as GPT-2 does."""
    token_embed = nn.Embedding(vocab_size, dim)
    pos_embed = nn.Embedding(max_len, dim)
    nn.init.normal_(token_embed.weight, std=0.02)
    nn.init.normal_(pos_embed.weight, std=0.02)
    return token_embed, pos_embed


def check_tokens(tokens: torch.Tensor, max_len: int, length: str, fix: str) -> None:
    """tokens is an integer (B, length) tensor no longer than max_len; ``fix`` says how to allow longer."""
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an integer tensor (B, {length}), got {tuple(tokens.shape)} {tokens.dtype}")
    if tokens.shape[1] > max_len:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's max_len {max_len}: {fix}")
