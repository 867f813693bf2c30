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


# The trainer tests' standard setting: a 2-block width-32 vit_micro, 3 epochs of 4 steps.
SMALL = synthetic_run(30, *small_vit(2, 32), "train.epochs=3", "train.lr=3e-3")
# "record" names the command line, the segments and their times: it differs between a resumed run and a
# straight one by design (summary.json only; metrics.jsonl rows carry no record).
TIMING_KEYS = {"time_s", "samples_per_s", "run_dir", "record"}


def small_cfg(*extra: str) -> dict:
    """The resolved config of SMALL plus ``extra`` overrides."""
    from polyattn.training import load_config

    return load_config(None, SMALL + list(extra))


def comparable(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows without their timings: what two runs must share to be the same run."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


# A nano XCiT cut to 4 narrow blocks on 12 generated 64-pixel images in batches of 4 (3 steps an
# epoch): a few seconds per detection epoch. The detection tests' --set overrides.
TINY_DETECT = [
    "model.backbone_kwargs={embed_dim: 48, depth: 4, num_heads: 4}",
    "model.out_indices=[0, 1, 2, 3]",
    "model.fpn_channels=32",
    "data.gen_train=12",
    "data.gen_val=6",
    "data.gen_size=64",
    "data.short_side=[64]",
    "data.max_size=64",
    "train.batch_size=4",
    "train.warmup_steps=2",
]
