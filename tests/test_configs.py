"""Every shipped config (and every point of every grid file) resolves, means what its name says, and trains."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from polyattn.cli import main
from polyattn.models import create_model
from polyattn.training import ConfigError, load_config, train
from polyattn.training.config import grid_points, is_grid_file

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# `polyattn train` configs: the top-level files (plain configs and grids) and base/ (lra/, timm/,
# pinn/... belong to other commands and are tested with them).
FILES = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.parent in (CONFIG_DIR, CONFIG_DIR / "base"))
GRIDS = {p.stem: p for p in FILES if is_grid_file(p)}
# (file, point or None): every run a `polyattn train` config describes.
CONFIGS = [(p, name) for p in FILES for name in (grid_points(p) if p.stem in GRIDS else [None])]


def points(group: str) -> dict[str, dict]:
    """point name -> resolved config, for the grid file configs/<group>.yaml."""
    return {name: load_config(GRIDS[group], point=name) for name in grid_points(GRIDS[group])}


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


def rel(item: tuple[Path, str | None]) -> str:
    path, point = item
    return str(path.relative_to(CONFIG_DIR)) + (f":{point}" if point else "")


def test_the_paper_runs_are_all_there():
    names = {rel(c) for c in CONFIGS}
    assert "digits_vit_micro.yaml" in names
    assert sum(n.startswith("table1.yaml:") for n in names) == 5
    assert sum(n.startswith("figure1.yaml:") for n in names) == 4 * 7
    assert sum(n.startswith("table2.yaml:") for n in names) == 4 * 5
    assert sum(n.startswith("table5.yaml:") for n in names) == 2 * 6
    assert sum(n.startswith("figure10.yaml:") for n in names) == 2 * 9


def test_figure10_scales_and_table2_norms():
    f10 = points("figure10")
    assert {c["model"]["name"] for c in f10.values()} == {"vit_base", "vit_small"}
    ks = sorted({float(c["model"]["activation"].split("/")[1]) for c in f10.values()})
    assert ks[0] == 8 and ks[-1] == 25 and all(c["model"]["activation"].startswith("x^3/") for c in f10.values())
    # Figures 4-5 are the norms of the Table 2 runs: they record them.
    assert {c["diagnostics"]["every"] for c in points("table2").values()} == {500}


@pytest.mark.parametrize("item", CONFIGS, ids=rel)
def test_config_trains_for_two_steps_on_generated_data(item, tmp_path):
    path, point = item
    cfg = load_config(path, point=point)
    assert cfg.get("description"), f"{rel(item)} has no description"
    summary = train(load_config(path, SMOKE, point=point), tmp_path / "run", progress=False)
    assert summary["steps"] == 2 and not summary["diverged"]
    assert summary["activation"] == cfg["model"]["activation"] and summary["model"] == cfg["model"]["name"]


def test_digits_config_is_the_main_setting():
    cfg = load_config(CONFIG_DIR / "digits_vit_micro.yaml")
    assert (cfg["model"]["name"], cfg["data"]["name"], cfg["model"]["activation"]) == (
        "vit_micro",
        "digits",
        "softmax",
    )
    # One pixel per token (65 tokens, where 1/sqrt(N) = 1/8.1 has room to act), a held-out test split
    # and model selection on validation only.
    assert cfg["model"]["overrides"] == {"patch_size": 1, "pos_embed_std": 1.0}
    assert (cfg["data"]["val_fraction"], cfg["data"]["test_fraction"], cfg["train"]["select"]) == (0.2, 0.2, "best_val")


def test_table1_is_vit_tiny_with_256_tokens_on_tiny_imagenet():
    acts = set()
    for cfg in points("table1").values():
        assert (cfg["model"]["name"], cfg["data"]["name"], cfg["data"]["image_size"]) == (
            "vit_tiny",
            "tiny_imagenet",
            64,
        )
        assert cfg["model"]["overrides"]["patch_size"] == 4
        acts.add(cfg["model"]["activation"])
    assert acts == {"softmax", "x^3/16", "x^3", "x/16", "x"}


@pytest.mark.parametrize("point", list(grid_points(CONFIG_DIR / "figure1.yaml")))
def test_figure1_sequence_length_and_scale(point):
    n, k = map(int, re.fullmatch(r"seq(\d+)_k(\d+)", point).groups())
    cfg = load_config(CONFIG_DIR / "figure1.yaml", point=point)
    assert cfg["model"]["activation"] == ("x^3" if k == 1 else f"x^3/{k}")
    with torch.device("meta"):
        model = create_model(cfg["model"]["name"], img_size=cfg["data"]["image_size"], **cfg["model"]["overrides"])
    assert model.patch_embed.num_patches == n


def test_table2_and_table5_models_recipes_and_activations():
    t2 = {(c["model"]["name"], c["model"]["activation"]): c for c in points("table2").values()}
    assert set(t2) == {
        (m, a)
        for m in ("vit_small", "vit_base", "deit_small", "deit_base")
        for a in ("softmax", "x^3/14", "x^3", "x/14", "x")
    }
    for (model, _), cfg in t2.items():
        assert cfg["data"]["name"] == "imagenet" and cfg["model"]["overrides"]["patch_size"] == 16
        deit = model.startswith("deit")
        assert (cfg["train"]["mixup"] > 0) == deit and (cfg["train"]["weight_decay"] == 0.05) == deit
    t5 = {(c["model"]["name"], c["model"]["activation"]) for c in points("table5").values()}
    assert t5 == {(m, a) for m in ("vit_base", "vit_small") for a in ("relu", "elu", "gelu", "tanh", "exp", "x^2/14")}


# --- grid files ---------------------------------------------------------------------------------
def test_grid_point_names_and_errors(tmp_path, capsys):
    assert list(grid_points(CONFIG_DIR / "table1.yaml")) == ["softmax", "x3_div16", "x3", "x_div16", "x"]
    with pytest.raises(ConfigError, match="grid of 5 runs: pick one with --point"):
        load_config(CONFIG_DIR / "table1.yaml")
    with pytest.raises(ConfigError, match="did you mean x3_div16"):
        load_config(CONFIG_DIR / "table1.yaml", point="x3_div61")
    with pytest.raises(ConfigError, match="not a grid"):
        load_config(CONFIG_DIR / "digits_vit_micro.yaml", point="x")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {lr: [1, 2]}\n")
    with pytest.raises(ConfigError, match="must be a dotted key"):
        grid_points(bad)
    bad.write_text("grid: {a: {p: {train.lr: 1}}, b: {p: {train.seed: 1}}}\n")
    assert list(grid_points(bad)) == ["p_p"]
    bad.write_text("grid: {activation: [x, 'X']}\n")
    with pytest.raises(ConfigError, match="both named 'x'"):
        grid_points(bad)
    assert main(["train", "--config", str(CONFIG_DIR / "table5.yaml"), "--list-points"]) == 0
    out = capsys.readouterr().out
    assert "12 points" in out and "vit_small_x2_div14" in out


def test_grid_layers_inherit_then_shared_then_labels(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {lr: 0.5, epochs: 3}\nmodel: {activation: x}\n")
    (tmp_path / "g.yaml").write_text(
        "train: {epochs: 7}\n"
        "grid:\n  recipe:\n    a: {inherit: a.yaml, train.warmup_epochs: 0}\n    plain: {}\n"
        "  activation: [softmax, 'x^3/sqrt(N)']\n"
    )
    pts = {n: load_config(tmp_path / "g.yaml", point=n) for n in grid_points(tmp_path / "g.yaml")}
    assert list(pts) == ["a_softmax", "a_x3_divsqrtN", "plain_softmax", "plain_x3_divsqrtN"]
    a = pts["a_x3_divsqrtN"]["train"]
    assert (a["lr"], a["epochs"], a["warmup_epochs"]) == (0.5, 7, 0)  # inherited, shared, the label's own
    assert pts["a_softmax"]["model"]["activation"] == "softmax"  # the activation axis wins over the file
    assert pts["plain_softmax"]["train"]["lr"] == load_config(None)["train"]["lr"]


def test_all_points_trains_every_point_and_resumes(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text("grid: {activation: [softmax, 'x^3/sqrt(N)']}\n")
    tiny = [*SMOKE, "model.overrides.patch_size=16"]
    args = ["train", "--config", str(grid), "--all-points", "--no-progress", "--set", *tiny]
    assert main([*args, "--out", str(tmp_path / "all")]) == 0
    printed = capsys.readouterr().out
    assert "softmax" in printed and "x3_divsqrtN" in printed
    for name in ("softmax", "x3_divsqrtN"):
        assert (tmp_path / "all" / "runs" / name / "summary.json").is_file()
    assert main([*args, "--out", str(tmp_path / "all")]) == 2  # runs exist: refused without --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume", str(tmp_path / "all")]) == 0
    assert "reused" in capsys.readouterr().out
