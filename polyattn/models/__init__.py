"""Models: a registry of classifiers (``create_model``) and the PolyAttention ViT."""

# Importing the builder modules registers their models; the registry has no other way to find them.
from . import causal_lm, lra  # noqa: F401  (causal_lm, lra_encoder, lra_dual_encoder)
from .registry import create_model, is_known_model, list_models, register_model
from .vit import VIT_SHAPES, Block, Mlp, PatchEmbed, ViT, resize_pos_embed

__all__ = [
    "Block",
    "Mlp",
    "PatchEmbed",
    "VIT_SHAPES",
    "ViT",
    "create_model",
    "is_known_model",
    "list_models",
    "register_model",
    "resize_pos_embed",
]
