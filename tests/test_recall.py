"""MQAR: the generator, the causal LM, token-level training, and polyattn recall end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from polyattn.cli import main
from polyattn.data.errors import DatasetError
from polyattn.data.mqar import IGNORE_INDEX, make_mqar
from polyattn.experiments.recall import RECALL_CONFIG, recall
from polyattn.models import create_model
from polyattn.training import train
from polyattn.training.config import load_config
from polyattn.training.grid import GridError

REPO = Path(__file__).resolve().parents[1]


def test_mqar_sequences_ask_every_key_once():
    g = torch.Generator().manual_seed(0)
    x, y = make_mqar(50, 64, 64, 4, g)
    assert x.shape == y.shape == (50, 64) and x.dtype == y.dtype == torch.long
    for row_x, row_y in zip(x, y, strict=True):
        keys, values = row_x[0:8:2], row_x[1:8:2]
        assert len(set(keys.tolist())) == 4 and bool((keys >= 1).all() & (keys < 32).all())
        assert bool((values >= 32).all() & (values < 64).all())
        asked = (row_y != IGNORE_INDEX).nonzero().flatten()
        assert len(asked) == 4 and bool((asked >= 8).all()) and bool((asked % 2 == 0).all())
        # at each asked position the input is a key and the label is that key's value
        answers = dict(zip(keys.tolist(), values.tolist(), strict=True))
        assert sorted(row_x[asked].tolist()) == sorted(answers)
        assert all(answers[int(row_x[i])] == int(row_y[i]) for i in asked)
    x2, y2 = make_mqar(50, 64, 64, 4, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(DatasetError, match="cannot place 40 key-value pairs.*lower data.num_kv_pairs"):
        make_mqar(2, 64, 64, 40, g)


def test_causal_lm_never_sees_the_future():
    torch.manual_seed(0)
    model = create_model("causal_lm", activation="x^3/sqrt(N)", vocab_size=32, max_len=16).eval()
    tokens = torch.randint(0, 32, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 32
    a, b = model(tokens), model(changed)
    assert a.shape == (2, 16, 32)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.equal(a[:, 10:], b[:, 10:])
    with pytest.raises(ValueError, match="exceeds the model's max_len 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


TINY = [
    "data.num_train=64",
    "data.num_val=32",
    "data.seq_len=16",
    "data.num_kv_pairs=2",
    "data.vocab_size=16",
    "train.epochs=1",
    "train.batch_size=16",
    "model.overrides.dim=16",
]


def test_token_level_training_scores_the_answers_only(tmp_path):
    cfg = load_config(RECALL_CONFIG, [*TINY, "train.amp=off"])
    summary = train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch = next(r for r in rows if r["kind"] == "epoch")
    # the loss and accuracy of the saved model, recomputed over the 32 x 2 answers by hand
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    model = create_model("causal_lm", activation="softmax", vocab_size=16, max_len=16, dim=16, depth=2, num_heads=1,
                         mlp_dim=128)  # fmt: skip
    model.load_state_dict(ckpt["model"])
    g = torch.Generator().manual_seed(0)
    make_mqar(64, 16, 16, 2, g)  # data.seed 0 draws the training set first, then validation
    x, y = make_mqar(32, 16, 16, 2, g)
    with torch.no_grad():
        logits = model.eval()(x)
    keep = y != IGNORE_INDEX
    assert int(keep.sum()) == 64
    assert epoch["val_loss"] == pytest.approx(float(F.cross_entropy(logits[keep], y[keep])), rel=1e-5)
    assert summary["final_val_acc"] == pytest.approx(float((logits[keep].argmax(-1) == y[keep]).float().mean()))


def test_recall_end_to_end(tmp_path, capsys):
    out = tmp_path / "recall"
    argv = ["recall", "--activations", "softmax,x^2/sqrt(N)", "--seeds", "1", "--seq-lens", "16,24", "--jobs", "1"]
    assert main([*argv, "--out", str(out), "--no-progress", "--norm-every", "2", "--set", *TINY[:2], *TINY[3:]]) == 0
    printed = capsys.readouterr().out
    assert "T=16" in printed and "T=24" in printed and "x^2/sqrt(N)" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["seq_lens"] == [16, 24]
    # The record lists the threads every run of every length trained with, from the runs' summaries.
    threads = {
        json.loads((out / f"T{n}" / r["run_dir"] / "summary.json").read_text())["record"]["threads"]
        for n in (16, 24)
        for r in json.loads((out / f"T{n}" / "results.json").read_text())["runs"]
    }
    assert results["record"]["threads_per_run"] == sorted(threads)
    for row in results["table"]:
        assert set(row["cells"]) == {"16", "24"} and all(c["n"] == 1 for c in row["cells"].values())
    for n in (16, 24):
        sub = json.loads((out / f"T{n}" / "results.json").read_text())
        assert sub["base_config"]["data"]["seq_len"] == n and len(sub["runs"]) == 2
        assert (out / f"T{n}" / "report.md").is_file() and (out / f"T{n}" / "norms.png").is_file()
    assert (out / "recall.png").read_bytes()[:4] == b"\x89PNG" and (out / "base_config.yaml").is_file()
    assert "[T16/report.md]" in (out / "report.md").read_text().replace("T=16: ", "")
    # the overview agrees with each length's own table
    sub16 = json.loads((out / "T16" / "results.json").read_text())
    assert results["table"][1]["cells"]["16"]["mean"] == sub16["table"][1]["mean"]


def test_recall_bad_arguments_are_named(tmp_path):
    with pytest.raises(GridError, match="data.seq_len is set per length"):
        recall(tmp_path, overrides=["data.seq_len=32"])
    with pytest.raises(GridError, match="integers >= 8"):
        recall(tmp_path, seq_lens=[4])
    with pytest.raises(ValueError, match="bad activation spec"):
        recall(tmp_path, activations=["x^3/foo"])
    # a length too short for the pairs fails before the first length trains
    with pytest.raises(DatasetError, match="cannot place 4 key-value pairs in seq_len=8"):
        recall(tmp_path / "short", seq_lens=[32, 8])
    assert not (tmp_path / "short" / "T32").exists()


def test_builtin_recall_config_equals_the_repository_config():
    from_file = load_config(REPO / "configs" / "recall" / "mqar_cpu.yaml")
    from_package = load_config(RECALL_CONFIG)
    assert from_package == from_file
    assert load_config(REPO / "configs" / "recall" / "zoology.yaml")["data"]["vocab_size"] == 8192


@pytest.mark.parametrize("spec", ["x/sqrt(N)", "x^2/sqrt(N)", "x^3/14"])
def test_token_by_token_decoding_through_the_state_and_a_kv_cache_equals_the_forward(spec):
    from polyattn.experiments.recall_decode import decode_causal_lm

    torch.manual_seed(0)
    model = create_model("causal_lm", activation=spec, vocab_size=16, max_len=12, dim=16, num_heads=2).double()
    tokens = torch.randint(0, 16, (3, 12))
    with torch.no_grad():
        ref = decode_causal_lm(model.eval(), tokens, "parallel")
        for route in ("kv-cache", "state"):
            torch.testing.assert_close(decode_causal_lm(model, tokens, route), ref, rtol=0, atol=1e-10)


def test_check_decoding_compares_a_trained_runs_answers(tmp_path, capsys):
    run = tmp_path / "run"
    train(load_config(RECALL_CONFIG, [*TINY, "train.amp=off", "model.activation=x^2/sqrt(N)"]), run, progress=False)
    assert main(["recall", "--check-decoding", str(run), "--check-sequences", "8"]) == 0
    assert "state vs KV cache: 0" in capsys.readouterr().out
    result = json.loads((run / "decoding_check.json").read_text())
    assert result["answers"] == 16 and result["differ_state_vs_kv_cache"] == 0
    assert result["differ_kv_cache_vs_parallel"] == 0 and result["max_logit_diff_state_vs_kv_cache"] < 1e-4
    assert len(set(result["accuracy"].values())) == 1  # one accuracy, whichever route decodes
    soft = tmp_path / "soft"
    train(load_config(RECALL_CONFIG, [*TINY, "train.amp=off"]), soft, progress=False)
    assert main(["recall", "--check-decoding", str(soft), "--check-sequences", "4"]) == 0
    assert "no state route: softmax" in capsys.readouterr().out
    assert main(["recall", "--check-decoding", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    from polyattn.experiments.recall_decode import decode_causal_lm

    softmax_lm = create_model("causal_lm", vocab_size=8, max_len=4)
    with pytest.raises(ValueError, match="route 'state' needs an x\\^p activation.*kv-cache"):
        decode_causal_lm(softmax_lm, torch.zeros(1, 4, dtype=torch.long), "state")
