"""Masks: which keys each query may attend (True = may attend)."""

from __future__ import annotations

import torch

__all__ = ["causal_mask", "combine_masks", "padding_to_attn_mask", "valid_key_counts"]


def causal_mask(nq: int, nk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(nq, nk) bool, key j allowed for query i iff j <= i (top-left aligned, as SDPA's is_causal)."""
    i = torch.arange(nq, device=device).unsqueeze(-1)
    j = torch.arange(nk, device=device)
    return j <= i


def combine_masks(
    attn_mask: torch.Tensor | None, causal: bool, nq: int, nk: int, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """One bool mask from an optional attn_mask and the causal flag, or None when nothing is masked."""
    if not causal:
        return attn_mask
    c = causal_mask(nq, nk, device)
    return c if attn_mask is None else attn_mask & c


def padding_to_attn_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) with True = padding (nn.MultiheadAttention's convention) -> (B, 1, 1, N) with True = may attend."""
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got dtype {key_padding_mask.dtype}")
    if key_padding_mask.dim() != 2:
        raise ValueError(f"key_padding_mask must have shape (B, N), got {tuple(key_padding_mask.shape)}")
    return (~key_padding_mask)[:, None, None, :]


def valid_key_counts(mask: torch.Tensor | None, shape: torch.Size | tuple[int, ...]) -> torch.Tensor | int:
    """Number of keys each query row may attend: (..., Nq, 1), or Nk when nothing is masked."""
    if mask is None:
        return shape[-1]
    return mask.expand(*shape).sum(dim=-1, keepdim=True)
