"""Integrations with other libraries: :func:`patch` switches the attention of whole models.

``polyattn.integrations.timm`` (needs ``pip install 'polyattn[timm]'``) patches
timm's ViT, DeiT, Swin, XCiT and CaiT attention and builds timm models with
:func:`polyattn.integrations.timm.create_timm_model`. It is imported on demand,
so this package never imports timm itself.
``polyattn.integrations.hf`` (``import polyattn.hf``, needs ``polyattn[hf]``): transformers attention (docs/hf.md).
"""

from .patch import PatchedAttention, patch, patchable_classes, register_attention_patch

__all__ = ["PatchedAttention", "patch", "patchable_classes", "register_attention_patch"]
