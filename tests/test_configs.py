"""Every shipped config resolves, means what its name says, and trains for a few steps."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from polyattn.models import create_model
from polyattn.training import load_config, train

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# `polyattn train` configs: the top-level files and these groups (lra/, timm/, pinn/...
# belong to other commands and are tested with them).
TRAIN_GROUPS = {"base", "table1", "figure1", "table2", "table5"}
CONFIGS = sorted(
    p
    for p in CONFIG_DIR.rglob("*.yaml")
    if p.parent == CONFIG_DIR or p.relative_to(CONFIG_DIR).parts[0] in TRAIN_GROUPS
)

# Generated data in place of the real dataset, two steps, and a narrow one-block model
# (96 splits into 3, 4, 6 or 12 heads); test_models checks the real shapes.
SMOKE = [
    "model.overrides.dim=96",
    "data={name: synthetic, num_train: 8, num_val: 4, num_classes: 3, image_size: 32, channels: 3}",
    "train.batch_size=4",
    "train.max_steps=2",
    "train.log_every=1",
    "model.overrides.depth=1",
]


def rel(p: Path) -> str:
    return str(p.relative_to(CONFIG_DIR))


def test_the_paper_runs_are_all_there():
    names = {rel(p) for p in CONFIGS}
    assert "digits_vit_micro.yaml" in names
    assert sum(n.startswith("table1/") for n in names) == 5
    assert sum(n.startswith("figure1/") for n in names) == 4 * 7
    assert sum(n.startswith("table2/") for n in names) == 4 * 5
    assert sum(n.startswith("table5/") for n in names) == 2 * 6


@pytest.mark.parametrize("path", CONFIGS, ids=rel)
def test_config_trains_for_two_steps_on_generated_data(path, tmp_path):
    cfg = load_config(path)
    assert cfg.get("description"), f"{rel(path)} has no description"
    summary = train(load_config(path, SMOKE), tmp_path / "run", progress=False)
    assert summary["steps"] == 2 and not summary["diverged"]
    assert summary["activation"] == cfg["model"]["activation"] and summary["model"] == cfg["model"]["name"]


def test_digits_config_is_the_main_setting():
    cfg = load_config(CONFIG_DIR / "digits_vit_micro.yaml")
    assert (cfg["model"]["name"], cfg["data"]["name"], cfg["model"]["activation"]) == (
        "vit_micro",
        "digits",
        "softmax",
    )
    assert cfg["model"]["overrides"]["patch_size"] == 2


def test_table1_is_vit_tiny_with_256_tokens_on_tiny_imagenet():
    acts = set()
    for p in CONFIG_DIR.glob("table1/*.yaml"):
        cfg = load_config(p)
        assert (cfg["model"]["name"], cfg["data"]["name"], cfg["data"]["image_size"]) == (
            "vit_tiny",
            "tiny_imagenet",
            64,
        )
        assert cfg["model"]["overrides"]["patch_size"] == 4
        acts.add(cfg["model"]["activation"])
    assert acts == {"softmax", "x^3/16", "x^3", "x/16", "x"}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("figure1/*.yaml")), ids=rel)
def test_figure1_sequence_length_and_scale(path):
    n, k = map(int, re.fullmatch(r"seq(\d+)_k(\d+)", path.stem).groups())
    cfg = load_config(path)
    assert cfg["model"]["activation"] == ("x^3" if k == 1 else f"x^3/{k}")
    with torch.device("meta"):
        model = create_model(
            cfg["model"]["name"], img_size=cfg["data"]["image_size"], **cfg["model"]["overrides"]
        )
    assert model.patch_embed.num_patches == n


def test_table2_and_table5_models_recipes_and_activations():
    t2 = {
        (c["model"]["name"], c["model"]["activation"]): c
        for c in map(load_config, CONFIG_DIR.glob("table2/*.yaml"))
    }
    assert set(t2) == {
        (m, a)
        for m in ("vit_small", "vit_base", "deit_small", "deit_base")
        for a in ("softmax", "x^3/14", "x^3", "x/14", "x")
    }
    for (model, _), cfg in t2.items():
        assert cfg["data"]["name"] == "imagenet" and cfg["model"]["overrides"]["patch_size"] == 16
        deit = model.startswith("deit")
        assert (cfg["train"]["mixup"] > 0) == deit and (cfg["train"]["weight_decay"] == 0.05) == deit
    t5 = {
        (c["model"]["name"], c["model"]["activation"])
        for c in map(load_config, CONFIG_DIR.glob("table5/*.yaml"))
    }
    assert t5 == {
        (m, a) for m in ("vit_base", "vit_small") for a in ("relu", "elu", "gelu", "tanh", "exp", "x^2/14")
    }
