"""polyattn bench --varlen: packed vs padded vs block mask runs end to end and rejects bad settings clearly."""

from __future__ import annotations

import json

from polyattn.cli import main


def test_varlen_bench_times_and_measures_every_layout(tmp_path, capsys):
    out = tmp_path / "varlen"
    argv = ["bench", "--varlen", "--lengths", "24,8,40", "--heads", "2", "--head-dim", "8", "--repeats", "1"]
    assert main([*argv, "--activations", "x^3/sqrt(N)", "--threads", "1", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "3 documents of 8..40 tokens (72 in all)" in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["activation"], r["layout"], r["method"]) for r in rows] == [
        ("x^3/sqrt(N)", "packed", "polyattn"),
        ("x^3/sqrt(N)", "padded", "polyattn"),
        ("x^3/sqrt(N)", "block mask", "polyattn"),
        ("softmax", "packed", "polyattn"),
        ("softmax", "block mask", "sdpa"),
        ("softmax", "packed", "torch varlen_attn"),
    ]
    for r in rows[:5]:
        assert r["time_s"] > 0 and r["peak_bytes"] >= 0 and "vs_packed" in r
    assert rows[0]["vs_packed"] == 1.0 and rows[0]["note"].startswith("auto: ")
    assert "CUDA only" in rows[5]["error"]  # CPU: torch's varlen_attn is flash kernels
    assert (out / "config.yaml").is_file() and (out / "report.txt").is_file()

    assert main([*argv, "--activations", "x^3/foo", "--out", str(out)]) == 2
    assert "bad activation spec" in capsys.readouterr().err
    assert main([*argv, "--decode", "--out", str(out)]) == 2
    assert "different benches" in capsys.readouterr().err
