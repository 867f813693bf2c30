"""The Long Range Arena encoder of the Nystromformer code base, with PolyAttention.

    tokens (B, L) [+ padding_mask (B, L), True = padding]
      -> token embedding + learned positional embedding, dropout     (B, L, dim)
      -> depth x pre-norm block: x + drop(attn(norm(x))), x + mlp(norm(x))
      -> final norm, mean pooling                                     (B, dim)
      -> head: Linear(dim, mlp_dim), ReLU, Linear(mlp_dim, classes)

Defaults are Nystromformer's LRA settings: dim 64, 2 layers, 2 heads of 32,
MLP 128 (GELU), dropout 0.1 on embeddings, attention weights and block
outputs, embeddings initialised N(0, 0.02). Padding goes to PolyAttention as
a key padding mask: padded keys get exactly zero weight after the activation
and the dynamic N of x^p/sqrt(N) counts valid keys only, so appending padding
never changes the logits. Trailing columns that are padding in every row are
cut before the blocks (cheaper; the same result by that property).

``protocol`` chooses what counts as padding and what the mean divides by:

    polyattn        the padding mask as given; the mean over the valid tokens
    nystromformer   as the Nystromformer LRA code (LRA/code/dataset.py, model.py,
                    model_wrapper.py): every token id 0 is padding, also inside a
                    sequence (black pixels in Image and Pathfinder), on top of the
                    given mask; the sum over the valid tokens is divided by the
                    padded length, the power of two that code pads to (``padded_len``:
                    2,048 for ListOps' 2,000, 1,024 for Text's 1,000, 4,096 for
                    Retrieval's 4,000, 1,024 for the images)

Under both, appending padding never changes the logits.

The dual encoder (Retrieval) encodes both documents with one shared encoder
and classifies [u, v, u*v, u-v] of the pooled vectors.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.activations import ActivationLike
from ..core.layers import PolyAttention
from . import _checks, _tokens
from .registry import register_model

__all__ = ["LRAEncoder", "LRAClassifier", "LRADualClassifier", "LRA_DEFAULTS", "LRA_PROTOCOLS"]

LRA_PROTOCOLS = ("polyattn", "nystromformer")
# "polyattn" stays the default so that models built before the protocol existed keep their outputs.
LRA_DEFAULTS = {
    "dim": 64,
    "depth": 2,
    "num_heads": 2,
    "mlp_dim": 128,
    "dropout": 0.1,
    "attn_drop": 0.1,
    "protocol": "polyattn",
}


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float, attn_drop: float, activation) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PolyAttention(dim, num_heads, activation, attn_drop=attn_drop, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask=key_padding_mask)
        return x + self.mlp(self.norm2(x))


class LRAEncoder(nn.Module):
    """Token sequence -> pooled vector (B, dim): embeddings, pre-norm blocks, final norm, masked mean.

    ``protocol``: "polyattn" or "nystromformer" (module docstring).
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        activation: ActivationLike = "softmax",
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 2,
        mlp_dim: int = 128,
        dropout: float = 0.1,
        attn_drop: float = 0.1,
        protocol: str = "polyattn",
    ) -> None:
        super().__init__()
        if protocol not in LRA_PROTOCOLS:
            raise ValueError(f"protocol must be one of {list(LRA_PROTOCOLS)}, got {protocol!r}")
        _tokens.check_sizes(vocab_size, max_len, dim, depth, num_heads, mlp_dim, dropout)
        _checks.probability("attn_drop", attn_drop)
        self.vocab_size, self.max_len, self.dim, self.protocol = vocab_size, max_len, dim, protocol
        self.padded_len = 1 << (max_len - 1).bit_length()
        self.token_embed, self.pos_embed = _tokens.embeddings(vocab_size, max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            _Block(dim, num_heads, mlp_dim, dropout, attn_drop, activation) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def _check(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None) -> None:
        fix = "build the model with a larger max_len or truncate the data (data.max_len)"
        _tokens.check_tokens(tokens, self.max_len, "L", fix)
        if padding_mask is not None and (padding_mask.shape != tokens.shape or padding_mask.dtype != torch.bool):
            raise ValueError(
                f"padding_mask must be bool of the tokens' shape {tuple(tokens.shape)}, "
                f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]"
            )

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L) long, padding_mask (B, L) bool True = padding -> pooled (B, dim)."""
        self._check(tokens, padding_mask)
        nystromformer = self.protocol == "nystromformer"
        if nystromformer:
            zero = tokens == 0
            padding_mask = zero if padding_mask is None else padding_mask | zero
        if padding_mask is not None:
            # Columns that are padding in every row change nothing: drop them.
            keep = (~padding_mask).any(0).nonzero()
            n = int(keep.max()) + 1 if keep.numel() else 1
            tokens, padding_mask = tokens[:, :n], padding_mask[:, :n]
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.token_embed(tokens) + self.pos_embed(positions))
        for block in self.blocks:
            x = block(x, padding_mask)
        x = self.norm(x)
        if padding_mask is None:
            return x.mean(1)
        valid = (~padding_mask).unsqueeze(-1).to(x.dtype)
        if nystromformer:
            # Their padded positions are zeroed and still counted: the divisor is the padded length, not
            # the width of this batch (trimmed above, or shorter than max_len), so padding stays inert.
            return (x * valid).sum(1) / self.padded_len
        return (x * valid).sum(1) / valid.sum(1).clamp_min(1.0)


def _head(in_dim: int, hidden: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class LRAClassifier(nn.Module):
    """LRAEncoder + MLP head: ``model(tokens, padding_mask=None) -> logits (B, num_classes)``."""

    def __init__(self, vocab_size: int, max_len: int, num_classes: int, activation="softmax", **kwargs) -> None:
        super().__init__()
        _checks.positive_int("num_classes", num_classes)
        self.encoder = LRAEncoder(vocab_size, max_len, activation, **kwargs)
        self.head = _head(self.encoder.dim, kwargs.get("mlp_dim", LRA_DEFAULTS["mlp_dim"]), num_classes)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(tokens, padding_mask))


class LRADualClassifier(nn.Module):
    """Shared LRAEncoder on two documents, head on [u, v, u*v, u-v]: ``model(tokens1, tokens2, ...)``."""

    def __init__(self, vocab_size: int, max_len: int, num_classes: int, activation="softmax", **kwargs) -> None:
        super().__init__()
        _checks.positive_int("num_classes", num_classes)
        self.encoder = LRAEncoder(vocab_size, max_len, activation, **kwargs)
        self.head = _head(4 * self.encoder.dim, kwargs.get("mlp_dim", LRA_DEFAULTS["mlp_dim"]), num_classes)

    def forward(
        self,
        tokens1: torch.Tensor,
        tokens2: torch.Tensor,
        padding_mask1: torch.Tensor | None = None,
        padding_mask2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        u = self.encoder(tokens1, padding_mask1)
        v = self.encoder(tokens2, padding_mask2)
        return self.head(torch.cat([u, v, u * v, u - v], dim=-1))


def _kwargs(overrides: dict) -> dict:
    unknown = set(overrides) - set(LRA_DEFAULTS)
    if unknown:
        raise TypeError(
            f"unknown argument(s) {sorted(unknown)}; the LRA models take vocab_size, max_len, num_classes, "
            f"{', '.join(LRA_DEFAULTS)}"
        )
    return {**LRA_DEFAULTS, **overrides}


@register_model("lra_encoder")
def lra_encoder(
    activation: str = "softmax",
    vocab_size: int = 32,
    max_len: int = 2000,
    num_classes: int = 10,
    pair: bool = False,
    **overrides,
) -> LRAClassifier:
    """The Nystromformer LRA classifier (ListOps, Text, Image, Pathfinder)."""
    if pair:
        raise ValueError("this dataset yields document pairs (Retrieval): use model.name=lra_dual_encoder")
    return LRAClassifier(vocab_size, max_len, num_classes, activation, **_kwargs(overrides))


@register_model("lra_dual_encoder")
def lra_dual_encoder(
    activation: str = "softmax",
    vocab_size: int = 257,
    max_len: int = 4000,
    num_classes: int = 2,
    pair: bool = True,
    **overrides,
) -> LRADualClassifier:
    """The Nystromformer LRA dual encoder (Retrieval)."""
    if not pair:
        raise ValueError("lra_dual_encoder needs a dataset of document pairs (lra_retrieval); use lra_encoder")
    return LRADualClassifier(vocab_size, max_len, num_classes, activation, **_kwargs(overrides))
