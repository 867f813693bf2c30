"""One key declaration for every kind of config: the resume-rule table every resume reads (every key of every
kind of run declares free, applied or fixed), and the bench/theory settings checked through the same Keys."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
from synthetic_setting import small_vit, synthetic_run

from polyattn.data.errors import DatasetError
from polyattn.data.registry import build_dataset, list_datasets
from polyattn.experiments.bench import BenchConfig
from polyattn.experiments.detection.config import DETECT_CONFIG
from polyattn.experiments.pinn.config import PINN_CONFIG
from polyattn.experiments.resume_rules import resume_docs
from polyattn.experiments.theory import TheoryConfig
from polyattn.training import load_config, train
from polyattn.training.checkpoint import config_changes
from polyattn.training.config import (
    RESUME_RULES,
    REUSABLE,
    ConfigError,
    ConfigSchema,
    Key,
    check_amp_device,
    resolve_config,
    trainer_schema,
)
from polyattn.utils import read_jsonl

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def test_the_docs_table_is_the_one_the_schemas_print():
    text = DOCS.read_text(encoding="utf-8")
    found = re.search(r"<!-- resume-rules: start -->\n(.*?)<!-- resume-rules: end -->", text, re.S)
    assert found, "docs/training.md lost its resume-rules markers"
    assert found.group(1) == resume_docs(), "run python -m polyattn.experiments.resume_rules and paste its output"


def test_every_key_of_every_kind_of_run_declares_a_rule():
    for schema in (trainer_schema(), PINN_CONFIG, DETECT_CONFIG):
        rules = {k: spec.resume for k, spec in schema.keys().items()}
        assert set(rules.values()) <= set(RESUME_RULES), schema.kind
    for name in list_datasets():
        keys = trainer_schema().keys({"data": {"name": name}})
        assert all(spec.resume in RESUME_RULES for spec in keys.values()), name
    with pytest.raises(ValueError, match=r"train.lr'\] declare no resume rule"):
        ConfigSchema("x config", {"train": {"lr": Key(1.0, "float")}})
    with pytest.raises(ValueError, match="Key.resume must be one of"):
        Key(1, "int", resume="sometimes")


def _schemas() -> dict[str, tuple[ConfigSchema, dict]]:
    return {
        "train": (trainer_schema(), resolve_config({})),
        "pinn": (PINN_CONFIG, PINN_CONFIG.load()),
        "detect": (DETECT_CONFIG, DETECT_CONFIG.load()),
    }


@pytest.mark.parametrize(
    ("kind", "free", "applied", "fixed"),
    [
        ("train", ("train", "num_threads", 3), ("train", "lr", 2e-3), ("train", "batch_size", 8)),
        ("pinn", ("train", "checkpoint_every", 7), ("train", "max_steps", 9), ("train", "lr", 0.5)),
        ("detect", ("data", "root", "/elsewhere"), ("train", "epochs", 2), ("train", "lr", 1e-3)),
    ],
)
def test_a_free_key_changes_silently_an_applied_one_is_recorded_a_fixed_one_refused(kind, free, applied, fixed):
    schema, cfg = _schemas()[kind]

    def change(old: dict, section: str, key: str, value) -> tuple[dict, str, list]:
        new = copy.deepcopy(old)
        new[section][key] = value
        return new, f"{section}.{key}", [old[section][key], value]

    with_free, _, _ = change(cfg, *free)
    assert config_changes(cfg, with_free, schema) == ({}, {})
    with_applied, key, values = change(with_free, *applied)
    assert config_changes(cfg, with_applied, schema) == ({key: values}, {})
    # A finished run is reused only across free keys: there the applied change is refused.
    assert config_changes(cfg, with_applied, schema, allowed=REUSABLE) == ({}, {key: values})
    with_fixed, key, values = change(with_free, *fixed)
    assert config_changes(cfg, with_fixed, schema) == ({}, {key: values})


def test_rules_of_nested_dataset_and_unknown_keys():
    schema = trainer_schema()
    assert schema.resume_rule("model.overrides.depth") == "fixed"  # an entry has its mapping's rule
    assert schema.resume_rule("description") == "free"
    assert schema.resume_rule("train.no_longer_a_key") == "fixed"
    assert schema.resume_rule("data.gen_workers", {"data": {"name": "lra_pathfinder"}}) == "free"
    assert schema.resume_rule("data.difficulty", {"data": {"name": "lra_pathfinder"}}) == "fixed"
    assert schema.resume_rule("data.num_workers", {"data": {"name": "no_such_dataset"}}) == "fixed"
    assert PINN_CONFIG.resume_rule("pde.params.beta") == "fixed" and PINN_CONFIG.resume_rule("preset") == "free"
    # A mapping key changes as one key, named once.
    old = resolve_config({})
    new = copy.deepcopy(old)
    new["model"]["overrides"] = {"depth": 1}
    assert config_changes(old, new, schema) == ({}, {"model.overrides": [{}, {"depth": 1}]})


def test_a_trainer_resume_takes_a_free_change_silently_and_records_an_applied_one(tmp_path):
    base = synthetic_run(16, *small_vit(1, 16), "train.epochs=1")
    run = tmp_path / "run"
    train(load_config(None, base), run, progress=False)
    more = load_config(None, [*base, "train.epochs=2", "train.num_threads=1", "train.log_every=3"])
    s = train(more, run, resume=True, progress=False)
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "resume"]
    assert [r["changed"] for r in rows] == [{"train.epochs": [1, 2]}]
    assert s["config_changes"] == [{"epoch": 1, "step": 4, "changed": {"train.epochs": [1, 2]}}]


def test_settings_fields_are_keys_checked_by_the_config_code():
    fields = {f.name: f for f in dataclasses.fields(BenchConfig)}
    assert fields["sdpa_backend"].metadata["key"].choices == ("auto", "flash", "efficient", "cudnn", "math")
    cfg = BenchConfig.from_dict({"ns": [64], "skip_factor": 4, "divisor": 14})
    assert cfg.skip_factor == 4.0 and isinstance(cfg.skip_factor, float) and cfg.activation(3) == "x^3/14"
    for bad, words in (
        ({"ns": [0]}, "bench config: ns must be a non-empty list of integers >= 1, got [0]"),
        ({"repeats": True}, "bench config: repeats must be an integer, got True"),
        ({"device": "tpu"}, "bench config: device must be one of ['auto', 'cpu', 'cuda'], got 'tpu'"),
        ({"divisor": "q"}, "bench config: divisor must be 'sqrt(N)', 'N', 'none' or a positive number, got 'q'"),
    ):
        with pytest.raises(ConfigError) as e:
            BenchConfig.from_dict(bad)
        assert str(e.value) == words
    # A theory error names the command-line option next to the field, as a CLI user typed it.
    with pytest.raises(ConfigError, match=r"theory config: D \(--D\) must be a positive integer, got 0"):
        TheoryConfig(D=0).resolved()


def test_fp16_on_a_cpu_is_refused_by_one_check():
    with pytest.raises(ConfigError, match="train.amp=fp16 needs a GPU"):
        load_config(None, ["train.device=cpu", "train.amp=fp16"])
    check_amp_device("fp16", "auto")  # the device is not known yet: the run checks again
    check_amp_device("bf16", "cpu")


def test_a_datasets_choices_and_ranges_are_checked_by_one_function():
    words = r"data.augment must be one of \[.*\] for dataset 'digits', got 'wild'"
    with pytest.raises(ConfigError, match=words):  # at config time, before any run directory exists
        load_config(None, ["data.augment=wild"])
    with pytest.raises(DatasetError, match=words):
        build_dataset({"name": "digits", "augment": "wild"}, 0)
    with pytest.raises(ConfigError, match=r"data.val_fraction must be in \(0, 1\), got 1.5"):
        load_config(None, ["data.val_fraction=1.5"])
