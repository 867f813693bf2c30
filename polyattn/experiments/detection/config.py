"""Configs of ``polyattn detect``: the shared config system (typed keys, inherit, --set, did-you-mean).

    cfg = resolve_detect_config("configs/detect/table3.yaml", ["data.root=data/coco"], point="x3_div14")

Layers, later winning: the defaults (the paper's Table 3 recipe), the preset (``paper`` or
``cpu``), the file, the overrides.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ...training.config import (
    ConfigError,
    ConfigSchema,
    Key,
    at_least,
    canonical_activation,
    greater_than,
    non_negative,
    positive_int,
)

__all__ = ["DETECT_CONFIG", "PRESETS", "resolve_detect_config"]


# The paper's Table 3: Mask R-CNN, XCiT-S12/16, COCO, 36 epochs (the 3x schedule), AdamW lr 1e-4,
# weight decay 0.05, batch 16; images resized to a shorter side of 800 (max 1333) and flipped.
# Resume rules: a resume may train longer (epochs), score more or less often, thread differently,
# run on another device or read the data from another place; everything else is fixed.
_SECTIONS: dict[str, dict[str, Key]] = {
    "model": {
        "activation": Key("softmax", "str", resume="fixed"),
        "backbone": Key("xcit_small_12_p16_224", "str", resume="fixed"),
        "out_indices": Key([3, 5, 7, 11], "list", resume="fixed"),
        "fpn_channels": positive_int(256, "fixed"),
        # Extra keyword arguments of the timm XCiT (embed_dim, depth, ...), for small CPU models.
        "backbone_kwargs": Key({}, "dict", resume="fixed"),
        # One anchor size per FPN level (strides 4 ... 64); mmdet's 8 x stride by default.
        "anchor_sizes": Key([32, 64, 128, 256, 512], "list", resume="fixed"),
        # Keyword arguments of torchvision's MaskRCNN (box_batch_size_per_image, rpn_*_nms_top_n_*, ...).
        "detector_kwargs": Key({}, "dict", resume="fixed"),
    },
    "data": {
        "root": Key(None, "str", nullable=True, resume="free"),
        "train_split": Key("train", "str", resume="fixed"),
        "val_split": Key("val", "str", resume="fixed"),
        "short_side": Key([800], "list", resume="fixed"),
        "max_size": positive_int(1333, "fixed"),
        "flip": Key(0.5, "float", check=lambda v: 0 <= v <= 1, requirement="in [0, 1]", resume="fixed"),
        # generated data (polyattn data coco-shapes) when root is null
        "gen_train": positive_int(200, "fixed"),
        "gen_val": positive_int(50, "fixed"),
        "gen_size": positive_int(96, "fixed"),
    },
    "train": {
        "epochs": positive_int(36, "applied"),
        "batch_size": positive_int(16, "fixed"),
        "lr": Key(1.0e-4, "float", check=greater_than(0), requirement="> 0", resume="fixed"),
        "weight_decay": non_negative(0.05, "fixed"),
        "warmup_steps": Key(500, "int", check=at_least(0), requirement=">= 0", resume="fixed"),
        # The 3x schedule divides the lr by 10 at epochs 27 and 33 of 36.
        "lr_steps": Key([27, 33], "list", resume="fixed"),
        "grad_clip": non_negative(0.0, "fixed"),
        "seed": Key(0, "int", check=at_least(0), requirement=">= 0", resume="fixed"),
        "num_threads": positive_int(None, "free", nullable=True),
        # auto: the GPU of this process's local rank when there is one (torchrun: one GPU per process)
        "device": Key("auto", "str", choices=("auto", "cpu", "cuda"), resume="free"),
        "eval_every": Key(
            0, "int", check=at_least(0), requirement=">= 0 (0: only after the last epoch)", resume="applied"
        ),
    },
}

# "cpu" trains a nano XCiT on generated shapes at 96 px in a few minutes on 2 cores (docs/detection.md).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {
        "model": {
            "backbone": "xcit_nano_12_p16_224",
            "fpn_channels": 64,
            "anchor_sizes": [8, 16, 32, 64, 128],
            # A fifth of torchvision's RoIs: shapes images hold at most four objects.
            "detector_kwargs": {
                "rpn_pre_nms_top_n_train": 400,
                "rpn_post_nms_top_n_train": 200,
                "rpn_pre_nms_top_n_test": 200,
                "rpn_post_nms_top_n_test": 100,
                "box_batch_size_per_image": 64,
                "box_detections_per_img": 20,
            },
        },
        "data": {"short_side": [96], "max_size": 96, "gen_train": 128, "gen_val": 32, "gen_size": 96},
        "train": {"epochs": 12, "batch_size": 8, "lr": 3.0e-4, "warmup_steps": 32, "lr_steps": [10], "grad_clip": 1.0},
    },
}


def _validate(cfg: dict) -> None:
    m = cfg["model"]
    canonical_activation(m)
    idx = m["out_indices"]
    if len(idx) != 4 or not all(isinstance(i, int) and i >= 0 for i in idx) or sorted(set(idx)) != list(idx):
        raise ConfigError(f"model.out_indices must be 4 increasing block indices such as [3, 5, 7, 11], got {idx}")
    sides = cfg["data"]["short_side"]
    if not sides or not all(isinstance(s, int) and s >= 16 for s in sides):
        raise ConfigError(f"data.short_side must be a list of integers >= 16 (one is drawn per image), got {sides}")
    anchors = m["anchor_sizes"]
    if len(anchors) != 5 or not all(isinstance(a, int) and a >= 1 for a in anchors):
        raise ConfigError(f"model.anchor_sizes must be 5 positive integers (one per FPN level), got {anchors}")
    steps = cfg["train"]["lr_steps"]
    if not all(isinstance(s, int) and s >= 1 for s in steps) or sorted(steps) != list(steps):
        raise ConfigError(f"train.lr_steps must be increasing epochs >= 1 (lr / 10 at each), got {steps}")


DETECT_CONFIG = ConfigSchema("detect config", _SECTIONS, presets=PRESETS, check=_validate)


def resolve_detect_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    preset: str | None = None,
    point: str | None = None,
) -> dict:
    """The full config of a detection run; unknown keys and bad values raise ConfigError naming them."""
    return DETECT_CONFIG.load(path, overrides, preset=preset, point=point)
