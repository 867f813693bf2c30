"""Mask R-CNN with an XCiT backbone whose attention activation polyattn sets (the paper's Table 3).

    from polyattn.experiments.detection import build_mask_rcnn
    model = build_mask_rcnn("x^3/sqrt(N)", num_classes=81)   # XCiT-S12/16 + FPN + torchvision's Mask R-CNN

The backbone follows the official XCiT detection code
(facebookresearch/xcit, ``detection/backbone/xcit.py``): the XCiT trunk
(convolutional patch embedding, Fourier positional encoding, XCA blocks; no
class-attention blocks, final norm or head) gives the token features after
four of its blocks, each reshaped to a (B, C, H/16, W/16) map and brought to
strides 4, 8, 16 and 32 by transposed convolutions, identity and max pooling.
Like the official code, no norm is applied to these outputs (the only norm is
the BatchNorm inside the stride-4 branch; the official code uses
SyncBatchNorm there: convert with ``nn.SyncBatchNorm.convert_sync_batchnorm``
for multi-GPU training). An FPN (with a max-pooled fifth level) and
torchvision's RPN and RoI heads complete the detector.

The trunk's modules are timm's own, under the same names (``patch_embed``,
``pos_embed``, ``blocks``), so an ImageNet XCiT checkpoint loads into
:class:`XCiTBackbone` with ``strict=False`` (its class-attention, norm and head
keys are left over). The attention activation is set with :func:`polyattn.patch`,
which swaps timm's ``XCA`` for polyattn's patched class (see
:mod:`polyattn.integrations.timm`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

try:
    import timm
    from timm.models.xcit import Xcit as _TimmXcit
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
except ImportError as e:  # pragma: no cover - exercised only without timm/torchvision
    raise ImportError(
        f"polyattn's detection experiment needs timm and torchvision: pip install timm torchvision ({e})"
    ) from e

from ...core.activations import ActivationLike, get_activation
from ...integrations.patch import patch

__all__ = [
    "ANCHOR_ASPECT_RATIOS",
    "ANCHOR_SIZES",
    "DEFAULT_OUT_INDICES",
    "XCiTBackbone",
    "XCiTFPN",
    "build_mask_rcnn",
]

# Blocks whose outputs feed the four scales, for a 12-block XCiT (the official detection config).
DEFAULT_OUT_INDICES: tuple[int, ...] = (3, 5, 7, 11)
# One anchor size per FPN level (strides 4, 8, 16, 32 and the pooled 64): mmdet's scale 8 x stride.
ANCHOR_SIZES: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
ANCHOR_ASPECT_RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0)


def _scale_ops(patch_size: int, dim: int) -> nn.ModuleList:
    """The official code's fpn1..fpn4: bring the 1/patch_size maps to strides 4, 8, 16, 32."""
    if patch_size == 16:
        return nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
                    nn.BatchNorm2d(dim),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
                ),
                nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(kernel_size=2, stride=2),
            ]
        )
    if patch_size == 8:
        return nn.ModuleList(
            [
                nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(kernel_size=2, stride=2),
                nn.MaxPool2d(kernel_size=4, stride=4),
            ]
        )
    raise ValueError(f"XCiT's convolutional patch embedding has patch size 8 or 16, got {patch_size}")


class XCiTBackbone(nn.Module):
    """A timm XCiT trunk as a 4-scale feature extractor (strides 4, 8, 16, 32), as in the official XCiT detection code.

    ``name`` and ``kwargs`` go to ``timm.create_model`` (never pretrained);
    ``model`` instead reuses the modules of an existing timm ``Xcit`` (the
    backbone then shares its weights). ``out_indices`` are the four blocks
    whose outputs become the scales, in order. The forward reproduces timm's
    ``Xcit.forward_features`` up to the last of those blocks: patch embedding
    (which gives the patch grid Hp x Wp), plus the Fourier positional
    encoding computed for that grid (so any image whose sides are multiples
    of the patch size works), ``pos_drop``, then ``blk(x, Hp, Wp)`` per
    block. Blocks after the last output index are dropped, as are the class
    attention, final norm and head, which detection does not use.

    Returns an ``OrderedDict`` ``{"0": stride 4, "1": stride 8, "2": stride 16,
    "3": stride 32}``, each (B, embed_dim, H / stride, W / stride).
    """

    def __init__(
        self,
        name: str = "xcit_small_12_p16_224",
        out_indices: Sequence[int] = DEFAULT_OUT_INDICES,
        *,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if model is None:
            if "pretrained" in kwargs:
                raise ValueError(
                    "XCiTBackbone never downloads weights (no pretrained=...): load a checkpoint with strict=False"
                )
            model = timm.create_model(name, pretrained=False, **kwargs)
        elif kwargs:
            raise ValueError(f"timm overrides {sorted(kwargs)} need a model built here: pass name, not model")
        if not isinstance(model, _TimmXcit):
            raise TypeError(f"XCiTBackbone needs a timm XCiT model, got {type(model).__name__} ({name!r})")
        out = tuple(int(i) for i in out_indices)
        depth = len(model.blocks)
        if len(out) != 4 or list(out) != sorted(set(out)) or out[0] < 0 or out[-1] >= depth:
            raise ValueError(
                f"out_indices must be 4 increasing block indices in [0, {depth}), got {tuple(out_indices)}"
            )
        self.out_indices = out
        self.patch_size: int = model.patch_embed.patch_size
        self.embed_dim: int = model.embed_dim
        self.patch_embed = model.patch_embed
        self.pos_embed = model.pos_embed
        self.pos_drop = model.pos_drop
        self.blocks = nn.ModuleList(list(model.blocks)[: out[-1] + 1])
        self.scales = _scale_ops(self.patch_size, self.embed_dim)
        self.grad_checkpointing = False

    def forward_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the ``out_indices`` blocks, each (B, embed_dim, Hp, Wp) (timm's forward, no rescaling)."""
        b, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image sides must be multiples of the patch size {self.patch_size}, got {h}x{w}")
        x, (hp, wp) = self.patch_embed(x)  # (B, Hp * Wp, C), row-major over the patch grid
        if self.pos_embed is not None:
            # (B, C, Hp, Wp) -> (B, C, N) -> (B, N, C), as timm's forward_features
            x = x + self.pos_embed(b, hp, wp).reshape(b, -1, x.shape[1]).permute(0, 2, 1)
        x = self.pos_drop(x)
        features = []
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, hp, wp, use_reentrant=False)
            else:
                x = blk(x, hp, wp)
            if i in self.out_indices:
                features.append(x.transpose(1, 2).reshape(b, -1, hp, wp))
        return features

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.forward_tokens(x)
        return OrderedDict((str(i), op(f)) for i, (op, f) in enumerate(zip(self.scales, feats, strict=True)))


class XCiTFPN(nn.Module):
    """:class:`XCiTBackbone` followed by an FPN with a max-pooled fifth level: the ``backbone`` of Mask R-CNN.

    Returns ``{"0", "1", "2", "3", "pool"}``, strides 4 to 64, each with
    ``out_channels`` channels (the attribute torchvision's detectors read).
    """

    def __init__(self, body: XCiTBackbone, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork([body.embed_dim] * 4, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def build_mask_rcnn(
    activation: ActivationLike = "softmax",
    num_classes: int = 4,
    backbone: str = "xcit_small_12_p16_224",
    out_indices: Sequence[int] = DEFAULT_OUT_INDICES,
    fpn_channels: int = 256,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    *,
    native_softmax: bool = True,
    anchor_sizes: Sequence[int] = tuple(s[0] for s in ANCHOR_SIZES),
    detector_kwargs: dict[str, Any] | None = None,
    **backbone_kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN (torchvision's) on an XCiT + FPN backbone whose XCA attention computes with ``activation``.

    ``num_classes`` counts the background (torchvision's convention: COCO's
    80 categories are ``num_classes=81``). ``backbone`` and ``backbone_kwargs``
    go to ``timm.create_model`` (never pretrained; e.g. ``drop_path_rate``,
    or ``embed_dim``/``depth``/``num_heads`` for a small model).
    ``min_size``/``max_size`` are the resize bounds of torchvision's
    transform, which also pads the batch to multiples of 32, so every image
    reaches the backbone with sides divisible by the patch size.

    Anchors: one size per level (32 to 512 for strides 4 to 64), aspect
    ratios 0.5, 1, 2; box RoIAlign 7x7 and mask RoIAlign 14x14 over levels
    "0" to "3". The activation is set with :func:`polyattn.patch`; with
    ``softmax`` and ``native_softmax=True`` (default) timm's own XCA forward
    runs, exactly the unpatched model; ``native_softmax=False`` computes
    softmax through :func:`polyattn.attention` (same outputs to float
    rounding; polyattn's observers then see it). ``anchor_sizes``: one per
    level (small images want small anchors); ``detector_kwargs`` go to
    torchvision's ``MaskRCNN`` (``box_batch_size_per_image``,
    ``rpn_post_nms_top_n_train``, ...: fewer RoIs for CPU-sized runs).
    """
    if len(anchor_sizes) != len(ANCHOR_SIZES):
        raise ValueError(f"anchor_sizes needs one size per FPN level ({len(ANCHOR_SIZES)}), got {list(anchor_sizes)}")
    act = get_activation(activation)
    body = XCiTBackbone(backbone, out_indices, **backbone_kwargs)
    patch(body, act, native_softmax=native_softmax)
    model = MaskRCNN(
        XCiTFPN(body, fpn_channels),
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=AnchorGenerator(
            tuple((int(a),) for a in anchor_sizes), (ANCHOR_ASPECT_RATIOS,) * len(ANCHOR_SIZES)
        ),
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=14, sampling_ratio=2),
        **(detector_kwargs or {}),
    )
    return model
