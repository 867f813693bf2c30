"""polyattn bench --model: the training-step benchmark runs end to end and rejects bad settings clearly."""

from __future__ import annotations

import json

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
    assert "amp: unknown setting(s) ['fp8']" in capsys.readouterr().err
