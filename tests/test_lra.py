"""The LRA encoder (padding invariance), the task configs and `polyattn lra` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import polyattn
from polyattn.cli import main
from polyattn.experiments.lra import (
    CPU_PRESETS,
    PAPER_TABLE4,
    PROTOCOLS,
    TASKS,
    is_full_scale,
    lra_config,
    lra_grid,
    raw_lra_config,
    write_lra_configs,
)
from polyattn.models.lra import LRAClassifier, LRADualClassifier

REPO = Path(__file__).resolve().parents[1]
ACTIVATIONS = ["softmax", "x^3/14", "x/14", "x^3/sqrt(N)"]


def _batch(b: int, n: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (b, n), generator=g)
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    lengths[0] = n
    mask = torch.arange(n)[None] >= lengths[:, None]
    return tokens.masked_fill(mask, 0), mask


def _pad(tokens, mask, extra: int, fill: int = 0):
    b = tokens.shape[0]
    return (
        torch.cat([tokens, torch.full((b, extra), fill, dtype=tokens.dtype)], 1),
        torch.cat([mask, torch.ones(b, extra, dtype=torch.bool)], 1),
    )


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_padding_never_changes_logits(activation):
    torch.manual_seed(0)
    model = polyattn.create_model("lra_encoder", activation, vocab_size=20, max_len=64, num_classes=10).eval()
    tokens, mask = _batch(4, 24, 20)
    ref = model(tokens, mask)
    for extra, fill in [(8, 0), (40, 7)]:  # any token id under the mask: the mask decides, not the id
        t2, m2 = _pad(tokens, mask, extra, fill)
        assert torch.equal(model(t2, m2), ref) or torch.allclose(model(t2, m2), ref, atol=1e-6, rtol=0)
    # each row alone, cut to its valid tokens, without a mask at all: the same logits
    for i in range(4):
        n = int((~mask[i]).sum())
        alone = model(tokens[i : i + 1, :n])
        torch.testing.assert_close(alone, ref[i : i + 1], atol=1e-5, rtol=1e-5)


def test_padding_mask_zeroes_keys_without_trimming():
    """Padding inside the kept width (another row is longer) must not leak either: compare row by row."""
    torch.manual_seed(1)
    model = polyattn.create_model("lra_encoder", "x^3/sqrt(N)", vocab_size=12, max_len=32, num_classes=3).eval()
    tokens, mask = _batch(3, 16, 12, seed=3)
    tokens2 = tokens.masked_fill(mask, 5)  # different ids under the mask
    torch.testing.assert_close(model(tokens, mask), model(tokens2, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("activation", ["softmax", "x^3/14"])
def test_dual_encoder_padding_and_combination(activation):
    torch.manual_seed(0)
    model = polyattn.create_model("lra_dual_encoder", activation, vocab_size=30, max_len=40).eval()
    assert isinstance(model, LRADualClassifier)
    t1, m1 = _batch(3, 20, 30, seed=1)
    t2, m2 = _batch(3, 12, 30, seed=2)
    ref = model(t1, t2, m1, m2)
    assert ref.shape == (3, 2)
    a, am = _pad(t1, m1, 10)
    b, bm = _pad(t2, m2, 25, fill=3)
    torch.testing.assert_close(model(a, b, am, bm), ref, atol=1e-6, rtol=0)
    u, v = model.encoder(t1, m1), model.encoder(t2, m2)
    torch.testing.assert_close(model.head(torch.cat([u, v, u * v, u - v], -1)), ref)


def test_encoder_shape_and_defaults():
    model = polyattn.create_model("lra_encoder", vocab_size=18, max_len=2000, num_classes=10)
    assert isinstance(model, LRAClassifier)
    enc = model.encoder
    assert enc.dim == 64 and len(enc.blocks) == 2
    attn = enc.blocks[0].attn
    assert attn.num_heads == 2 and attn.head_dim == 32 and attn.activation.spec == "softmax"
    assert enc.blocks[0].mlp[0].out_features == 128
    assert enc.pos_embed.weight.shape == (2000, 64)


def test_encoder_errors():
    model = polyattn.create_model("lra_encoder", vocab_size=10, max_len=8, num_classes=2)
    with pytest.raises(ValueError, match="exceeds the model's max_len 8"):
        model(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"):
        model(torch.full((1, 4), 10))
    with pytest.raises(ValueError, match="padding_mask must be bool"):
        model(torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="lra_dual_encoder"):
        polyattn.create_model("lra_encoder", pair=True)
    with pytest.raises(ValueError, match="lra_encoder"):
        polyattn.create_model("lra_dual_encoder", pair=False)
    with pytest.raises(TypeError, match="unknown argument"):
        polyattn.create_model("lra_encoder", img_size=32)


def test_task_settings_match_nystromformer():
    # (batch, steps, warmup) from Nystromformer's LRA/code/lra_config.py
    expected = {
        "listops": (32, 5000, 1000),
        "text": (32, 20000, 8000),
        "retrieval": (32, 30000, 800),
        "image": (256, 35000, 175),
        "pathfinder": (256, 62400, 312),
    }
    for name, (batch, steps, warmup) in expected.items():
        cfg = lra_config(name, "x^3/14")
        tc = cfg["train"]
        assert (tc["batch_size"], tc["max_steps"], tc["warmup_steps"]) == (batch, steps, warmup)
        assert tc["lr"] == 1e-4 and tc["weight_decay"] == 0 and tc["eps"] == 1e-6
        # the epochs cover the steps on the official training split
        assert tc["epochs"] * -(-TASKS[name].train_size // batch) >= steps
        assert cfg["model"]["activation"] == "x^3/14"
    assert lra_config("retrieval")["model"]["name"] == "lra_dual_encoder"
    assert set(PAPER_TABLE4) == {"softmax", "x^3/14", "x/14"}


def test_config_files_are_the_task_settings(tmp_path):
    """configs/lra/ is what write_lra_configs writes, and each file resolves to lra_config's config."""
    written = write_lra_configs(tmp_path)
    for path in written:
        rel = path.relative_to(tmp_path)
        repo_file = REPO / "configs" / "lra" / rel
        assert repo_file.is_file(), f"configs/lra/{rel} missing: run write_lra_configs('configs/lra')"
        assert yaml.safe_load(repo_file.read_text()) == yaml.safe_load(path.read_text()), rel
    cfg = polyattn.training.load_config(REPO / "configs" / "lra" / "cpu.yaml", point="listops_x3_div14")
    assert cfg == lra_config("listops", "x^3/14", preset="cpu")
    # Every point of both grids is the task's config.
    from polyattn.training.config import grid_points

    for grid, preset in (("table4.yaml", None), ("cpu.yaml", "cpu")):
        for name in grid_points(REPO / "configs" / "lra" / grid):
            task, _, act = name.partition("_")
            act = {"softmax": "softmax", "x3_div14": "x^3/14", "x_div14": "x/14", "x3_divsqrtN": "x^3/sqrt(N)"}[act]
            got = polyattn.training.load_config(REPO / "configs" / "lra" / grid, point=name)
            assert got == lra_config(task, act, preset=preset), name


def test_full_scale_detection():
    assert is_full_scale(lra_config("listops", "x^3/14"))
    assert is_full_scale(lra_config("text", data="/data/imdb", overrides=["train.seed=3", "train.num_threads=2"]))
    assert not is_full_scale(lra_config("listops", preset="cpu"))
    assert not is_full_scale(lra_config("image", overrides=["train.max_steps=100"]))
    assert not is_full_scale(lra_config("pathfinder", overrides=["model.overrides={attn_drop: 0.0}"]))


def test_cpu_preset_only_for_generated_tasks():
    assert set(CPU_PRESETS) == {"listops", "pathfinder"}
    with pytest.raises(ValueError, match="no CPU preset for 'text'"):
        raw_lra_config("text", preset="cpu")
    with pytest.raises(ValueError, match="unknown LRA task"):
        raw_lra_config("wikitext")


def test_lra_layer_files_ship_with_the_package():
    # setuptools expands each package-data pattern per folder ("*" does not cross "/"): every LRA layer
    # file must be named by one, or an installed polyattn has no LRA settings.
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["polyattn"]
    shipped = {p for pat in patterns for p in (REPO / "polyattn").glob(pat)}
    root = REPO / "polyattn" / "experiments" / "configs" / "lra"
    layers = {p.relative_to(root).as_posix(): p for p in root.rglob("*.yaml")}
    assert [name for name, p in layers.items() if p not in shipped] == []
    assert {"common.yaml", "protocols/nystromformer.yaml", "tasks/listops.yaml", "cpu/pathfinder.yaml"} <= set(layers)
    assert len(layers) == 1 + len(PROTOCOLS) + len(TASKS) + len(CPU_PRESETS)


def test_grid_files_are_written_byte_for_byte(tmp_path):
    # The repository's grid files are write_lra_configs' output itself, comments and key order included.
    for path in write_lra_configs(tmp_path):
        assert (REPO / "configs" / "lra" / path.name).read_text() == path.read_text(), path.name
    for call in (lambda: lra_config("listops", preset="gpu"), lambda: lra_grid("gpu")):
        with pytest.raises(ValueError, match="unknown preset 'gpu'; presets: cpu"):
            call()


def _tiny_listops(tmp_path) -> list[str]:
    return [
        "--set",
        "data.num_train=96",
        "data.num_val=32",
        "data.num_test=32",
        "data.max_len=40",
        "data.gen_max_length=40",
        "train.epochs=2",
        "train.warmup_steps=2",
        "train.num_threads=1",
    ]


def test_polyattn_lra_end_to_end_listops(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POLYATTN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["lra", "--task", "listops", "--activation", "x^3/14", "--preset", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv + _tiny_listops(tmp_path)) == 0
    result = json.loads((out / "lra_result.json").read_text())
    assert result["task"] == "listops" and result["activation"] == "x^3/14" and result["reduced_scale"]
    assert result["seed"] == 0
    assert 0.0 <= result["test_acc"] <= 1.0 and result["steps"] == 6 and result["paper_test_acc"] == 0.375
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "last.pt").is_file()
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "37.50%" in printed
    # the generated data sits in the cache and is reused by the next run
    cached = list((tmp_path / "cache" / "lra" / "listops").glob("*/basic_train.tsv"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    out2 = tmp_path / "run2"
    argv2 = [
        "lra",
        "--task",
        "listops",
        "--activation",
        "softmax",
        "--preset",
        "cpu",
        "--out",
        str(out2),
        "--no-progress",
    ]
    assert main(argv2 + _tiny_listops(tmp_path)) == 0
    assert cached[0].stat().st_mtime_ns == stamp
    assert main(["lra", "--table", str(out), str(out2), "--out", str(tmp_path / "table.md")]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "| listops | softmax | 0 |" in table and "| listops | x^3/14 | 0 |" in table and "37.1" in table
    assert "mean ± std" not in table  # one seed per setting: nothing to average
    # A second seed of the x^3/14 setting: the table adds its mean ± std over the two seeds.
    out3 = tmp_path / "run3"
    assert main([*argv[:-3], "--out", str(out3), "--no-progress", *_tiny_listops(tmp_path), "train.seed=1"]) == 0
    accs = [100 * json.loads((d / "lra_result.json").read_text())["test_acc"] for d in (out, out3)]
    capsys.readouterr()
    assert main(["lra", "--table", str(out), str(out2), str(out3)]) == 0
    table = capsys.readouterr().out
    mean, std = sum(accs) / 2, abs(accs[0] - accs[1]) / 2**0.5
    assert f"| listops | x^3/14 | 2 | 0 | {mean:.1f} ± {std:.1f} | 37.5 |" in table
    assert "| listops | softmax | 1 | 0 |" in table


def test_polyattn_lra_pathfinder_generated(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYATTN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pf"
    argv = [
        "lra",
        "--task",
        "pathfinder",
        "--activation",
        "x/14",
        "--preset",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "data.num_images=40",
        "data.gen_workers=1",
        "train.epochs=1",
        "train.num_threads=1",
    ]
    assert main(argv) == 0
    result = json.loads((out / "lra_result.json").read_text())
    assert result["task"] == "pathfinder" and result["data"]["image_size"] == [16, 16]
    assert result["data"]["train"] == 32 and result["data"]["test"] == 4


def test_polyattn_lra_missing_data_is_one_clear_error(tmp_path, capsys):
    code = main(["lra", "--task", "text", "--data", str(tmp_path / "imdb"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "imdb") in err and "aclImdb" in err
    assert main(["lra", "--task", "retrieval", "--out", str(tmp_path / "r2")]) == 2
    assert "data.root is not set" in capsys.readouterr().err


def test_polyattn_data_listops_command(tmp_path, capsys):
    code = main(
        [
            "data",
            "listops",
            "--out",
            str(tmp_path),
            "--train",
            "4",
            "--val",
            "2",
            "--test",
            "2",
            "--min-length",
            "10",
            "--max-length",
            "30",
            "--no-progress",
        ]
    )
    assert code == 0 and (tmp_path / "basic_val.tsv").is_file()
    assert len((tmp_path / "basic_train.tsv").read_text().splitlines()) == 5
    assert main(["data", "listops", "--out", str(tmp_path), "--min-length", "30", "--max-length", "30"]) == 2
    assert "min_length" in capsys.readouterr().err
