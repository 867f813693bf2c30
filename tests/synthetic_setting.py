"""The suite's small training setting, shared by the trainer tests: generated data, seconds per run."""

from __future__ import annotations


def synthetic_run(num_val: int, *extra: str) -> list[str]:
    """--set overrides for 64 synthetic 8x8 one-channel images of 4 classes in batches of 16 (4 steps
    an epoch), logging every step, one warmup epoch; ``extra`` adds the model and the rest."""
    return [
        "data.name=synthetic",
        "data.num_train=64",
        f"data.num_val={num_val}",
        "data.image_size=8",
        "data.channels=1",
        "data.num_classes=4",
        "train.batch_size=16",
        "train.log_every=1",
        "train.warmup_epochs=1",
        *extra,
    ]


def small_vit(depth: int, dim: int) -> list[str]:
    """A vit_micro of ``depth`` blocks of width ``dim``, 2 heads, patch 4 (4 tokens and a class token)."""
    return [
        f"model.overrides.depth={depth}",
        f"model.overrides.dim={dim}",
        "model.overrides.num_heads=2",
        "model.overrides.patch_size=4",
    ]
