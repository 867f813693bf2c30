"""Bad inputs fail early with one clear error: empty LRA splits, out-of-range data keys, bad model sizes,
bad ``polyattn theory`` options."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import polyattn
from polyattn.cli import main
from polyattn.data import DatasetError, DatasetFormatError, build_dataset, dataset_checks
from polyattn.data import registry as data_registry
from polyattn.data.lra.listops import load_listops, read_listops_tsv
from polyattn.data.lra.pathfinder import load_pathfinder
from polyattn.data.lra.retrieval import load_aan, read_aan_tsv
from polyattn.data.lra.text import load_imdb
from polyattn.experiments.theory import TheoryConfig
from polyattn.models.pinnsformer import build_pinn_model
from polyattn.training.config import ConfigError
from polyattn.training.trainer import build_model

_EXPR = "( ( ( [MAX 2 ) 3 ) ] )"


# --- LRA: empty splits and empty rows ---------------------------------------------------------------
def _listops_dir(root: Path, train_rows=((_EXPR, 3),) * 4, val_rows=((_EXPR, 3),) * 2, test_rows=((_EXPR, 3),) * 2):
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train_rows), ("val", val_rows), ("test", test_rows)):
        with open(root / f"basic_{split}.tsv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["Source", "Target"])
            writer.writerows(rows)
    return root


def test_listops_header_only_train_file_is_an_error(tmp_path):
    root = _listops_dir(tmp_path / "lo", train_rows=())
    train = root / "basic_train.tsv"
    with pytest.raises(DatasetFormatError, match="only the header") as e:
        read_listops_tsv(train)
    assert str(train) in str(e.value) and "polyattn data listops --out DIR" in str(e.value)
    with pytest.raises(DatasetFormatError, match="basic_train.tsv"):
        load_listops(root)
    with pytest.raises(DatasetFormatError, match="basic_train.tsv"):
        build_dataset({"name": "lra_listops", "root": str(root)}, seed=0)


@pytest.mark.parametrize("split", ["val", "test"])
def test_listops_empty_val_or_test_file_is_an_error(tmp_path, split):
    root = _listops_dir(tmp_path / "lo", **{f"{split}_rows": ()})
    with pytest.raises(DatasetFormatError, match=f"basic_{split}.tsv"):
        load_listops(root)
    (root / f"basic_{split}.tsv").write_bytes(b"")  # not even a header
    with pytest.raises(DatasetFormatError, match="empty ListOps file"):
        load_listops(root)


@pytest.mark.parametrize("source", ["", "   ", "( ( ) )"])
def test_listops_row_without_tokens_names_file_and_line(tmp_path, source):
    root = _listops_dir(tmp_path / "lo", train_rows=[(_EXPR, 3), (source, 4)])
    with pytest.raises(DatasetFormatError, match="line 3") as e:
        read_listops_tsv(root / "basic_train.tsv")
    assert str(root / "basic_train.tsv") in str(e.value) and "polyattn data listops" in str(e.value)


def test_lra_command_with_empty_listops_train_split_exits_2(tmp_path, capsys):
    root = _listops_dir(tmp_path / "lo", train_rows=())
    out = tmp_path / "run"
    argv = ["lra", "--task", "listops", "--data", str(root), "--out", str(out), "--preset", "cpu", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(root / "basic_train.tsv") in err and "polyattn data listops" in err
    assert not (out / "lra_result.json").exists()


def test_data_listops_refuses_to_write_an_empty_split(tmp_path, capsys):
    out = tmp_path / "lo"
    assert main(["data", "listops", "--out", str(out), "--train", "0", "--no-progress"]) == 2
    assert "number of train samples must be an int >= 1, got 0" in capsys.readouterr().err
    assert not out.exists()


def _aan_dir(root: Path, lines: dict[str, list[str]]) -> Path:
    root.mkdir(parents=True)
    for split in ("train", "eval", "test"):
        default = ["1\ta\tb\tsome text\tother text", "0\tc\td\tmore\tstill more"]
        (root / f"new_aan_pairs.{split}.tsv").write_text("\n".join(lines.get(split, default)) + "\n")
    return root


def test_aan_empty_file_and_empty_text(tmp_path):
    root = _aan_dir(tmp_path / "aan", {"eval": []})
    with pytest.raises(DatasetFormatError, match="empty AAN pairs file") as e:
        load_aan(root, progress=False)
    assert "new_aan_pairs.eval.tsv" in str(e.value)
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\ta\tb\tfine\tfine\n0\tc\td\t\tfine\n")
    with pytest.raises(DatasetFormatError, match=r"line 2: empty text of document 1") as e:
        read_aan_tsv(bad, progress=False)
    assert str(bad) in str(e.value)


def _imdb_dir(root: Path) -> Path:
    for split in ("train", "test"):
        for label, rating in (("pos", 9), ("neg", 2)):
            folder = root / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                (folder / f"{i}_{rating}.txt").write_text(f"a {label} review")
    return root


def test_imdb_empty_review_and_empty_validation_split(tmp_path):
    root = _imdb_dir(tmp_path)
    empty = root / "aclImdb" / "train" / "pos" / "7_10.txt"
    empty.write_bytes(b"")
    with pytest.raises(DatasetFormatError, match="empty review") as e:
        load_imdb(root, max_len=16)
    assert str(empty) in str(e.value)
    empty.unlink()
    # 4 training reviews: 90% held out leaves floor(0.1 * 4) = 0 to train on
    with pytest.raises(DatasetError, match="leaves the training split empty"):
        load_imdb(root, max_len=16, val_fraction=0.9)


def _pathfinder_dir(root: Path, n: int) -> Path:
    (root / "metadata").mkdir(parents=True)
    (root / "imgs" / "0").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(np.full((4, 4), 10 * i, dtype=np.uint8), mode="L").save(root / "imgs" / "0" / f"sample_{i}.png")
        lines.append(f"imgs/0 sample_{i}.png {i} {i % 2}")
    (root / "metadata" / "0.npy").write_text("\n".join(lines) + "\n")
    return root


def test_pathfinder_too_few_images_for_the_split(tmp_path):
    root = _pathfinder_dir(tmp_path / "pf", 5)
    with pytest.raises(DatasetError, match="split") as e:
        load_pathfinder(root)
    assert str(root) in str(e.value) and "at least 10 images" in str(e.value)
    with pytest.raises(DatasetError, match=r"data\.num_images must be an int >= 10"):
        build_dataset({"name": "lra_pathfinder", "root": str(root), "num_images": 5}, seed=0)


def _cifar10(root: Path, per_batch: int = 1) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": np.zeros((per_batch, 3072), dtype=np.uint8), b"labels": [0] * per_batch}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return root


def test_lra_image_fraction_leaving_a_split_empty(tmp_path):
    root = _cifar10(tmp_path)  # 5 training images
    with pytest.raises(DatasetError, match="training split empty"):
        build_dataset({"name": "lra_image", "root": str(root), "train_fraction": 0.05}, seed=0)
    with pytest.raises(DatasetError, match="validation split empty"):
        build_dataset({"name": "lra_image", "root": str(root), "train_fraction": 0.95}, seed=0)


def test_registry_rejects_a_builder_that_returns_an_empty_split():
    import torch
    from torch.utils.data import TensorDataset

    name = "_reliability_empty_train"

    def build(cfg, seed):
        empty, one = TensorDataset(torch.zeros(0, 1)), TensorDataset(torch.zeros(1, 1))
        return data_registry.DataBundle(empty, one, None, 2, {}, {"source": "/some/where"})

    data_registry.register_dataset(name)(build)
    try:
        with pytest.raises(DatasetError, match=r"the train split is empty \(/some/where\)"):
            build_dataset({"name": name}, seed=0)
    finally:
        data_registry._DATASETS.pop(name)


# --- data keys out of range ----------------------------------------------------------------------
@pytest.mark.parametrize("frac", [0, 1, 1.5, -0.1, float("nan")])
def test_digits_val_fraction_outside_the_open_interval(frac):
    with pytest.raises(DatasetError, match=r"data\.val_fraction must be in \(0, 1\), got"):
        build_dataset({"name": "digits", "val_fraction": frac}, seed=0)


def test_digits_val_fraction_too_small_for_any_validation_example():
    with pytest.raises(DatasetError, match="validation split of digits empty"):
        build_dataset({"name": "digits", "val_fraction": 0.001}, seed=0)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"name": "cifar10", "val_fraction": 1.0}, r"data\.val_fraction must be in \[0, 1\)"),
        ({"name": "cifar100", "val_fraction": -0.1}, r"data\.val_fraction must be in \[0, 1\)"),
        ({"name": "cifar10", "image_size": 0}, r"data\.image_size must be a positive int"),
        ({"name": "lra_text", "val_fraction": 1.0}, r"data\.val_fraction must be in \[0, 1\)"),
        ({"name": "lra_text", "max_len": 0}, r"data\.max_len must be an int >= 1"),
        ({"name": "lra_image", "train_fraction": 1.0}, r"data\.train_fraction must be in \(0, 1\)"),
        ({"name": "lra_image", "train_fraction": 0}, r"data\.train_fraction must be in \(0, 1\)"),
        ({"name": "lra_listops", "num_train": 0}, r"data\.num_train must be an int >= 1"),
        ({"name": "lra_listops", "num_test": -1}, r"data\.num_test must be an int >= 1"),
        ({"name": "lra_listops", "max_len": 0}, r"data\.max_len must be an int >= 1"),
        ({"name": "lra_listops", "gen_min_length": 50, "gen_max_length": 40}, r"data\.gen_min_length \(50\)"),
        ({"name": "lra_retrieval", "num_val": -1}, r"data\.num_val must be an int >= 0"),
        ({"name": "lra_pathfinder", "num_images": 0}, r"data\.num_images must be an int >= 10"),
        ({"name": "lra_pathfinder", "image_size": 4}, r"data\.image_size must be an int >= 8"),
        ({"name": "synthetic", "num_train": 0}, r"data\.num_train must be an int >= 1"),
        ({"name": "synthetic", "noise": -1.0}, r"data\.noise must be in \[0, inf\)"),
        ({"name": "image_folder", "crop_pct": 0}, r"data\.crop_pct must be in \(0, 1\]"),
        ({"name": "tiny_imagenet", "image_size": [8]}, r"data\.image_size must be a positive int"),
    ],
)
def test_data_key_ranges_are_checked_before_loading(tmp_path, monkeypatch, cfg, message):
    # Generating datasets would write here if a check were missing.
    monkeypatch.setenv("POLYATTN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DatasetError, match=message):
        build_dataset(cfg, seed=0)
    assert not (tmp_path / "cache").exists()


def test_checks_are_declared_in_the_registry():
    predicate, requirement = dataset_checks("digits")["val_fraction"]
    assert requirement == "in (0, 1)" and predicate(0.5) and not predicate(1.0) and not predicate(True)
    assert dataset_checks("cifar10")["val_fraction"][0](0.0)  # 0 = validate on the test set
    with pytest.raises(ValueError, match="undeclared keys"):
        data_registry.register_dataset("_bad", {"a": 1}, checks={"b": data_registry.int_at_least(0)})


def test_train_command_with_bad_val_fraction_exits_2(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "run"), "--no-progress", "--set", "data.val_fraction=1.5"])
    err = capsys.readouterr().err
    assert code == 2 and "data.val_fraction must be in (0, 1), got 1.5" in err and "Traceback" not in err


# --- model sizes ------------------------------------------------------------------------------------
_VIT = {"img_size": 8, "in_chans": 1, "num_classes": 3, "patch_size": 4}
_LRA = {"vocab_size": 8, "max_len": 8, "num_classes": 2}


@pytest.mark.parametrize(
    "name, overrides, argument",
    [
        ("vit_micro", {"num_heads": 0}, "num_heads"),
        ("vit_micro", {"num_heads": -2}, "num_heads"),
        ("vit_micro", {"num_heads": 3}, "divisible by num_heads"),
        ("vit_micro", {"dim": 0}, "dim"),
        ("vit_micro", {"depth": 0}, "depth"),
        ("vit_micro", {"depth": -1}, "depth"),
        ("vit_micro", {"patch_size": 0}, "patch_size"),
        ("vit_micro", {"patch_size": 3}, "not divisible by patch_size"),
        ("vit_micro", {"mlp_ratio": 0}, "mlp_ratio"),
        ("vit_micro", {"mlp_ratio": -1.0}, "mlp_ratio"),
        ("vit_micro", {"drop_rate": 1.5}, "drop_rate"),
        ("deit_tiny", {"num_heads": 0}, "num_heads"),
        ("lra_encoder", {"num_heads": 0}, "num_heads"),
        ("lra_encoder", {"dim": 0}, "dim"),
        ("lra_encoder", {"dim": 63}, "divisible by num_heads"),
        ("lra_encoder", {"depth": 0}, "depth"),
        ("lra_encoder", {"mlp_dim": -1}, "mlp_dim"),
        ("lra_encoder", {"dropout": -0.1}, "dropout"),
        ("lra_encoder", {"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_model_sizes_are_value_errors_naming_the_argument(name, overrides, argument):
    base = _LRA if name.startswith("lra") else _VIT
    kwargs = {**base, **overrides}
    with pytest.raises(ValueError, match=argument):
        polyattn.create_model(name, **kwargs)
    with pytest.raises(ConfigError, match=rf"cannot build model '{name}' with model.overrides .*{argument}"):
        build_model(name, "softmax", kwargs)


@pytest.mark.parametrize(
    "name, kwargs, argument",
    [
        ("pinnsformer", {"num_heads": 0}, "num_heads"),
        ("pinnsformer", {"num_heads": 3}, "divisible by num_heads"),
        ("pinnsformer", {"d_model": 0}, "d_model"),
        ("pinnsformer", {"d_ff": 0}, "d_ff"),
        ("pinnsformer", {"num_layers": 0}, "num_layers"),
        ("pinnsformer", {"seq_len": 0}, "seq_len"),
        ("mlp", {"hidden": 0}, "hidden"),
        ("mlp", {"num_layers": 1}, "num_layers"),
    ],
)
def test_bad_pinn_sizes_are_value_errors_naming_the_argument(name, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        build_pinn_model(name, **kwargs)


# --- polyattn theory ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option, value",
    [
        ("--D", "0"),
        ("--D", "-4"),
        ("--d", "0"),
        ("--samples", "0"),
        ("--samples", "-3"),
        ("--n-grid", "0"),
        ("--n-grid", "1"),
        ("--n-grid", "8"),
        ("--bound-n", "0"),
        ("--bound-samples", "0"),
        ("--sigma-x", "0"),
        ("--sigma-x", "nan"),
        ("--sigma-t", "-1"),
        ("--activations", "nonsense"),
        ("--threads", "0"),
        ("--seed", "-1"),
    ],
)
def test_theory_bad_option_is_one_error_line_and_no_output(tmp_path, capsys, option, value):
    out = tmp_path / "theory"
    assert main(["theory", "--quick", "--out", str(out), "--no-progress", "--no-plots", option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: theory config: ") and f"({option})" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe samples: 3\n", "not UTF-8 text"),
        (b"samples: [1, 2\n", "not valid YAML (line 2"),
        (b"a: b: c\n", "not valid YAML (line 1"),
        (b"- 1\n- 2\n", "expected a YAML mapping"),
        (b"D: abc\n", "D (--D) must be a positive integer, got 'abc'"),
        (b"n_grid: 8\n", "n_grid (--n-grid) must be a non-empty list"),
        (b"activations: softmax\n", "activations (--activations) must be a list"),
        (b"1: 2\n", "unknown key(s) ['1']"),
    ],
)
def test_theory_bad_config_file_exits_2(tmp_path, capsys, content, message):
    cfg = tmp_path / "theory.yaml"
    cfg.write_bytes(content)
    out = tmp_path / "theory"
    assert main(["theory", "--config", str(cfg), "--out", str(out), "--no-progress", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_theory_config_checks_sizes_before_deriving_sigma_t():
    with pytest.raises(ValueError, match=r"D \(--D\) must be a positive integer, got 0"):
        TheoryConfig(D=0).resolved()
    with pytest.raises(ValueError, match=r"D \(--D\) must be a positive integer, got -4"):
        TheoryConfig(D=-4).resolved()
    with pytest.raises(ValueError, match="expected a mapping"):
        TheoryConfig.from_dict(["samples", 3])
