"""Vision transformer with PolyAttention, readable top to bottom.

    image (B, C, H, W)
      -> PatchEmbed: non-overlapping patches, linear projection  (B, N, dim)
      -> prepend class token, add learned positional embedding    (B, 1 + N, dim)
      -> depth x Block: x + attn(norm(x)), x + mlp(norm(x))        (pre-norm)
      -> final norm, class token -> linear head                   (B, num_classes)

ViT and DeiT share this architecture; ``deit_*`` names differ from ``vit_*``
only in the training recipe their configs use (see docs/training.md). DeiT's
distillation token is not used.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.activations import ActivationLike
from ..core.diagnostics import AttentionMapRecorder
from ..core.layers import PolyAttention
from ..core.module import set_activation as _set_activation
from . import _checks
from .registry import register_model

__all__ = [
    "PatchEmbed",
    "Mlp",
    "Block",
    "ViT",
    "resize_pos_embed",
    "VIT_SHAPES",
]


def _pair(v: int | tuple[int, int] | list[int], what: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        pair = (v, v)
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        pair = (int(v[0]), int(v[1]))
    else:
        raise ValueError(f"{what} must be an int or a pair [height, width] of ints, got {v!r}")
    if min(pair) < 1:
        raise ValueError(f"{what} must be positive, got {v!r}")
    return pair


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping (ph, pw) patches and project each to ``dim``."""

    def __init__(self, img_size, patch_size, in_chans: int, dim: int) -> None:
        super().__init__()
        self.img_size = _pair(img_size, "img_size")
        self.patch_size = _pair(patch_size, "patch_size")
        (h, w), (ph, pw) = self.img_size, self.patch_size
        if h % ph or w % pw:
            raise ValueError(
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}: "
                "choose a patch size that tiles the image"
            )
        self.grid_size = (h // ph, w // pw)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        # A convolution with stride = kernel = patch is the patch-wise linear map.
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"expected images of shape (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}), "
                f"got {tuple(x.shape)}; build the model with img_size/in_chans matching the data"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim), patches in row-major order


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per example with probability p."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        activation: ActivationLike = "softmax",
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PolyAttention(dim, num_heads, activation, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Interpolate a (1, prefix + gh*gw, dim) positional embedding to another patch grid.

    Prefix tokens (the class token) keep their embedding; the grid part is
    resized bicubically, as done when fine-tuning a ViT at another resolution.
    ``old_grid`` defaults to a square grid and must be given for rectangular ones.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, dim), got {tuple(pos_embed.shape)}")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n_old = grid.shape[1]
    if old_grid is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise ValueError(
                f"cannot infer the patch grid of a positional embedding with {n_old} patch tokens "
                "(not a square); pass old_grid=(rows, cols)"
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n_old:
        raise ValueError(f"old_grid {old_grid} does not hold {n_old} patch tokens")
    new_grid = tuple(new_grid)  # type: ignore[assignment]
    if tuple(old_grid) == new_grid:
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class ViT(nn.Module):
    """Vision transformer classifier: class token, learned positional embedding, PolyAttention.

    ``activation`` is a spec string (``"softmax"``, ``"x^3/16"``, ``"x^3/sqrt(N)"``...)
    used by every block; ``set_activation`` (or :func:`polyattn.core.set_activation`,
    which works on any model) switches all blocks in place.
    Loading a state dict whose positional embedding was trained on another
    image size interpolates it to this model's patch grid.

    ``pos_embed_std`` is the initial scale of the positional embedding (ViT's
    0.02 by default). With one-pixel patches the patch projection starts at
    about unit scale (PyTorch's default init with a fan-in of 1), so 0.02 leaves
    positions all but invisible and training crawls; 1.0 puts them on the same
    scale (the digits comparison uses it, see docs/compare.md).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        activation: ActivationLike = "softmax",
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pos_embed_std: float = 0.02,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_chans", in_chans),
            ("num_classes", num_classes),
            ("dim", dim),
            ("depth", depth),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # PolyAttention checks heads too, but in its own terms; these name the ViT's arguments.
        _checks.heads("dim", dim, num_heads)
        _checks.positive_number("mlp_ratio", mlp_ratio)
        _checks.positive_number("pos_embed_std", pos_embed_std)
        if int(dim * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio ({mlp_ratio}) times dim ({dim}) must give an MLP width of at least 1")
        for name, value in (
            ("drop_rate", drop_rate),
            ("attn_drop_rate", attn_drop_rate),
            ("drop_path_rate", drop_path_rate),
        ):
            _checks.probability(name, value)
        self.num_classes = num_classes
        self.dim = dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # Stochastic depth grows linearly with depth, as in DeiT.
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, activation, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rates[i])
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights(pos_embed_std)

    def _init_weights(self, pos_embed_std: float) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=pos_embed_std)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # --- activation ---------------------------------------------------------
    @property
    def activation(self) -> str:
        """Spec string of the blocks' activation."""
        return self.blocks[0].attn.activation.spec

    def set_activation(self, spec: ActivationLike) -> None:
        _set_activation(self, spec)

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay (besides biases and norms)."""
        return {"pos_embed", "cls_token"}

    # --- forward -------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + N, dim) with class token and positions."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])

    # --- inspection ----------------------------------------------------------
    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, layers: list[int] | None = None) -> list[torch.Tensor]:
        """Per-layer attention matrices A (B, heads, 1 + N, 1 + N) for a batch of images.

        Recorded by :class:`polyattn.core.AttentionMapRecorder` (which works on
        any model), so A is the exact matrix the attention applies (token 0 is
        the class token). ``layers`` picks 0-based layers (default: all). Uses
        the current module state; call ``model.eval()`` first for dropout-free maps.
        """
        wanted = sorted(set(range(len(self.blocks))) if layers is None else set(layers))
        bad = [i for i in wanted if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"layers {bad} out of range for a model with {len(self.blocks)} blocks")
        if not wanted:
            return []
        with AttentionMapRecorder(self, layers=wanted, device=None) as rec:
            x = self.embed(x)
            # The blocks after the last wanted one cannot change its map: skip them.
            for block in self.blocks[: wanted[-1] + 1]:
                x = block(x)
        return [rec.get(i) for i in wanted]

    @torch.no_grad()
    def cls_attention(self, x: torch.Tensor, layers: list[int] | None = None) -> list[torch.Tensor]:
        """Class-token attention to the patches as images: per layer (B, heads, grid_h, grid_w)."""
        gh, gw = self.patch_embed.grid_size
        return [a[:, :, 0, 1:].reshape(a.shape[0], a.shape[1], gh, gw) for a in self.attention_maps(x, layers)]

    # --- loading -------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch hook
        # Interpolate a positional embedding trained at another image size so
        # that plain ``load_state_dict`` works across resolutions.
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            state_dict[key] = resize_pos_embed(state_dict[key], self.patch_embed.grid_size)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# name -> (dim, depth, num_heads). DeiT shares the shapes; its recipe lives in configs.
VIT_SHAPES: dict[str, tuple[int, int, int]] = {
    "vit_micro": (64, 4, 4),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "deit_tiny": (192, 12, 3),
    "deit_small": (384, 12, 6),
    "deit_base": (768, 12, 12),
}


def _make_builder(name: str, dim: int, depth: int, heads: int):
    def build(activation: ActivationLike = "softmax", **overrides) -> ViT:
        kwargs = {"dim": dim, "depth": depth, "num_heads": heads, **overrides}
        try:
            return ViT(activation=activation, **kwargs)
        except TypeError as e:
            raise TypeError(f"{name}: {e}") from None

    build.__name__ = name
    build.__qualname__ = name
    build.__doc__ = (
        f"ViT with dim {dim}, depth {depth}, {heads} heads (defaults: 224x224 RGB, patch 16, 1000 classes); "
        "keyword overrides go to polyattn.models.ViT."
    )
    return build


for _name, (_dim, _depth, _heads) in VIT_SHAPES.items():
    register_model(_name)(_make_builder(_name, _dim, _depth, _heads))
