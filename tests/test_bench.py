"""polyattn bench --model: the training-step benchmark runs end to end and rejects bad settings clearly."""

from __future__ import annotations

import json

import pytest

from polyattn.cli import main


def test_model_bench_times_each_activation_and_precision(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--model", "vit_micro", "--out", str(out), "--no-progress", "--activations", "softmax,x^3/16"]
    argv += ["--img-size", "8", "--patch-size", "2", "--in-chans", "1", "--batch-size", "4", "--steps", "2"]
    assert main([*argv, "--amp", "off,bf16", "--threads", "1", "--backends", "auto"]) == 0
    table = capsys.readouterr().out
    assert "8x8x1 images" in table and " bf16 " in table
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [(r["activation"], r["amp"]) for r in rows] == [
        ("softmax", "off"),
        ("x^3/16", "off"),
        ("softmax", "bf16"),
        ("x^3/16", "bf16"),
    ]
    assert all(r["tokens"] == 17 and len(r["step_times_s"]) == 2 and r["imgs_per_s"] > 0 for r in rows)
    # Each row is compared with softmax at its own precision.
    assert rows[0]["vs_softmax_auto"] == 1.0 and rows[2]["vs_softmax_auto"] == 1.0
    assert rows[3]["vs_softmax_auto"] == rows[3]["imgs_per_s"] / rows[2]["imgs_per_s"]
    assert (out / "config.yaml").is_file() and (out / "report.txt").is_file()

    assert main([*argv, "--amp", "fp8"]) == 2
    assert "amp must be a non-empty list of some of auto, off, bf16, fp16, got ['fp8']" in capsys.readouterr().err


def test_decode_bench_compares_kv_cache_and_state(tmp_path, capsys):
    out = tmp_path / "dec"
    argv = ["bench", "--decode", "--contexts", "64,256", "--heads", "2", "--head-dim", "8", "--steps", "2"]
    assert main([*argv, "--activations", "x^2/sqrt(N)", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "state" in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["context"], r["activation"], r["method"]) for r in rows] == [
        (n, a, m)
        for n in (64, 256)
        for a, m in (("softmax", "kv-cache"), ("x^2/sqrt(N)", "kv-cache"), ("x^2/sqrt(N)", "state"))
    ]
    for r in rows:
        # the cache holds 2 (L + 1) d floats per head; the state C(d + 1, 2) x d floats and a count per head
        expected = 2 * 2 * (r["context"] + 1) * 8 * 4 if r["method"] == "kv-cache" else 2 * (36 * 8 + 1) * 4
        assert r["bytes"] == expected and r["tokens_per_s"] > 0
    assert (out / "decode.png").read_bytes()[:4] == b"\x89PNG"
    assert main([*argv, "--activations", "softmax", "--out", str(out)]) == 2
    assert "compares x^p activations" in capsys.readouterr().err


def test_hf_decode_bench_generates_with_the_kv_cache_and_the_state_cache(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "dec_hf"
    argv = ["bench", "--decode", "--hf", "--contexts", "24,48", "--layers", "1", "--heads", "2", "--kv-heads", "1"]
    argv += ["--head-dim", "8", "--new-tokens", "3", "--activations", "x^2/sqrt(N)", "--threads", "1"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    assert "cache mem" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["context"], r["activation"], r["method"]) for r in rows] == [
        (n, a, m)
        for n in (24, 48)
        for a, m in (("softmax", "kv-cache"), ("x^2/sqrt(N)", "kv-cache"), ("x^2/sqrt(N)", "state"))
    ]
    for r in rows:
        # keys and values of the L + 2 tokens fed back, 1 layer x 1 k/v head x d = 8; or C(9, 2) x 8 floats + a count
        expected = 2 * (r["context"] + 2) * 8 * 4 if r["method"] == "kv-cache" else (36 * 8 + 1) * 4
        assert r["cache_bytes"] == expected and r["tokens_per_s"] > 0 and r["prefill_s"] > 0
        assert r.get("same_tokens_as_kv_cache", True)
    assert (out / "decode_hf.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "--hf", "--out", str(out)]) == 2
    assert "give --decode --hf" in capsys.readouterr().err
    assert main([*argv, "--kv-heads", "3", "--out", str(out)]) == 2
    assert "multiple of kv_heads" in capsys.readouterr().err


def test_grid_bench_times_causal_and_each_pass_separately(tmp_path, capsys):
    import pytest

    from polyattn.experiments.bench import BenchConfig, run_bench

    cfg = BenchConfig.from_dict(
        {"ns": [32], "ds": [8], "ps": [3], "backends": ["chunked"], "repeats": 1, "device": "cpu"}
        | {"causal": [False, True], "modes": ["fwd", "bwd", "fwd+bwd"], "num_threads": 1}
    )
    results = run_bench(cfg, tmp_path / "b", progress=False, plots=False)
    cases = results["cases"]
    # SDPA softmax and chunked x^3 for each (causal, mode): 2 x 3 x 2 timed cases.
    assert {(c["backend"], c["causal"], c["mode"]) for c in cases} == {
        (b, causal, mode) for b in ("sdpa-softmax", "chunked") for causal in (False, True) for mode in cfg.modes
    }
    assert all(c["time_s"] > 0 and c["time_vs_sdpa"] > 0 for c in cases if c["backend"] == "chunked")
    assert len({c["key"] for c in cases}) == len(cases)
    # Memory is one fwd+bwd; the forward-only and backward-only rows have none.
    assert all(("peak_bytes" in c) == (c["mode"] == "fwd+bwd") for c in cases)
    table = (tmp_path / "b" / "report.txt").read_text()
    assert "x^3/sqrt(N)  causal bwd  vs SDPA" in table and "x^3/sqrt(N)  fwd  vs SDPA" in table
    for bad, match in (
        ({"modes": ["forward"]}, "modes must be"),
        ({"sdpa_backend": "flash2"}, r"sdpa_backend must be one of \['auto', 'flash'"),
        ({"causal": []}, "causal must be"),
    ):
        with pytest.raises(ValueError, match=match):
            BenchConfig.from_dict(bad)
