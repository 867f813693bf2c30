"""The run record: what it names (code, libraries, threads, precision, backends, command line), where it is
written, and the time of a resumed run summed over its segments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from synthetic_setting import small_cfg

from polyattn.core.backends import BACKENDS, select_backend
from polyattn.core.module import attention_modules, module_activation
from polyattn.experiments.compare import compare
from polyattn.training import load_run, train
from polyattn.training.precision import resolve_amp
from polyattn.utils.record import BackendRecorder, code_version, run_record

REPO = Path(__file__).resolve().parents[1]


class _Kill(Exception):
    pass


def _kill_at_epoch(epoch: int):
    def callback(row):
        if row["kind"] == "epoch" and row["epoch"] == epoch:
            raise _Kill

    return callback


def _inputs_seen(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """Each attention module's (q, k, mask, bias, causal) on one training forward, seen by a plain observer."""
    seen: dict[str, tuple] = {}
    names = {id(m): n for n, m in attention_modules(model)}

    def observe(module, q, k, attn_mask, bias, causal, scale):
        seen.setdefault(names[id(module)], (q, k, attn_mask, bias, causal))

    for _, m in attention_modules(model):
        m.attention_observers.append(observe)
    model.train()
    with torch.no_grad():
        model(x)
    for _, m in attention_modules(model):
        m.attention_observers.remove(observe)
    return seen


def test_record_of_a_process_names_code_libraries_and_command():
    rec = run_record(device="cpu", precision="off")
    assert rec["torch"] == torch.__version__ and rec["python"] == ".".join(map(str, sys.version_info[:3]))
    assert rec["threads"] == torch.get_num_threads() and rec["precision"] == "off"
    assert rec["command"] == sys.argv
    assert "numpy" in rec["libraries"] and rec["libraries"]["numpy"] is not None
    assert set(rec["libraries"]) == {"numpy", "timm", "torchvision", "transformers", "triton"}
    assert rec["cpu_class"] and rec["hardware"].endswith(f"({rec['cpu_class']})")
    # Run from a checkout: the commit is the checkout's HEAD.
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert code_version()["commit"] == head.stdout.strip()
        assert isinstance(code_version()["dirty"], bool)
    json.dumps(rec)  # a results file can hold it as it is


def test_backend_recorder_matches_select_backend_and_honours_a_fixed_backend():
    from polyattn.models import create_model

    model = create_model("vit_micro", "x^3/sqrt(N)", img_size=8, in_chans=1, num_classes=4, patch_size=4, depth=2)
    x = torch.randn(3, 1, 8, 8)
    names = [n for n, _ in attention_modules(model)]
    attention_modules(model)[1][1].backend = "reference"
    recorder = BackendRecorder(model)
    model.train()
    with torch.no_grad():
        model(x)
    recorder.detach()
    assert recorder.done and list(recorder.chosen) == names
    assert all(not m.attention_observers for _, m in attention_modules(model))
    q, k, mask, bias, causal = _inputs_seen(model, x)[names[0]]
    act = module_activation(attention_modules(model)[0][1])
    expected = select_backend(q, k, act, attn_mask=mask, bias=bias, causal=causal).name
    assert recorder.chosen[names[0]] == expected in BACKENDS
    assert recorder.chosen[names[1]] == "reference"


def test_train_summary_and_checkpoint_carry_the_record(tmp_path):
    threads = torch.get_num_threads()
    cfg = small_cfg("train.num_threads=1", "train.amp=auto", "train.epochs=1")
    s = train(cfg, tmp_path / "r", progress=False)
    assert torch.get_num_threads() == threads  # restored after the run
    rec = s["record"]
    # Precision is the resolved train.amp (auto is bf16 on a CPU with native bf16, off elsewhere).
    written = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["train"]["amp"]
    assert rec["precision"] == resolve_amp("auto", "cpu", warn=False) == written
    assert rec["threads"] == 1 and rec["device"] == "cpu"
    assert rec["segments"] == 1 and rec["command"] == sys.argv
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["record"] == rec
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["record"]["threads"] == 1 and ckpt["time_s_total"] > 0
    # The backend recorded per attention module is auto's choice for that module's real inputs.
    model, _ = load_run(tmp_path / "r")
    x = torch.randn(16, 1, 8, 8)  # one training batch of the setting
    seen = _inputs_seen(model, x)
    expected = {
        name: select_backend(q, k, module_activation(m), attn_mask=mk, bias=b, causal=c).name
        for (name, m), (q, k, mk, b, c) in zip(attention_modules(model), seen.values(), strict=True)
    }
    assert rec["backends"] == expected and len(expected) == 2
    # metrics.jsonl's summary row leaves the record out (it is the same for a resumed and a straight run).
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert "record" not in rows[-1] and rows[-1]["kind"] == "summary"


def test_time_of_a_resumed_run_is_summed_over_its_segments(tmp_path):
    cfg = small_cfg("train.num_threads=1")
    run = tmp_path / "r"
    with pytest.raises(_Kill):
        train(cfg, run, progress=False, callbacks=[_kill_at_epoch(2)])
    first = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert first["epoch"] == 2 and first["segments"] == 1
    s = train(cfg, run, resume=True, progress=False)
    second = s["record"]["segment_time_s"]
    assert s["record"]["segments"] == 2
    assert s["time_s"] == pytest.approx(first["time_s_total"] + second, abs=0.05)
    assert s["time_s"] > second + 0.5 * first["time_s_total"]
    # A checkpoint written before the total was kept still resumes; its earlier segments count as 0 s.
    old = tmp_path / "old"
    with pytest.raises(_Kill):
        train(cfg, old, progress=False, callbacks=[_kill_at_epoch(2)])
    ckpt = torch.load(old / "checkpoints" / "last.pt", weights_only=False)
    for key in ("time_s_total", "segments", "record"):
        del ckpt[key]
    torch.save(ckpt, old / "checkpoints" / "last.pt")
    s_old = train(cfg, old, resume=True, progress=False)
    assert s_old["epochs"] == 3 and s_old["record"]["segments"] == 2
    assert s_old["time_s"] == pytest.approx(s_old["record"]["segment_time_s"], abs=0.05)


def test_compare_results_record_threads_per_run(tmp_path):
    out = tmp_path / "cmp"
    tiny = ["train.max_steps=2", "model.overrides.depth=1", "model.overrides.dim=16", "model.overrides.num_heads=2"]
    overrides = ["train.num_threads=1", *tiny]
    compare(out, "x^3/sqrt(N)", "1", epochs=1, overrides=overrides, progress=False, figures=False, jobs=1)
    results = json.loads((out / "results.json").read_text())
    assert [r["threads"] for r in results["runs"]] == [1]
    assert results["record"]["threads_per_run"] == [1]
    assert results["record"]["precision_per_run"] == [results["settings"]["amp"]]
    assert results["record"]["backends"] == results["runs"][0]["backends"]
    assert results["record"]["command"][0] != "" and results["record"]["polyattn"] is not None
    report = (out / "report.md").read_text()
    assert "Threads per run: 1." in report and f"polyattn {results['record']['polyattn']}" in report
    assert f"Backends chosen: {', '.join(results['runs'][0]['backends'])}." in report


def test_bench_and_theory_results_carry_the_record(tmp_path):
    import time

    from polyattn.experiments.bench import BenchConfig, bench_results
    from polyattn.experiments.theory import TheoryConfig, run_theory

    # bench_results is shared by every bench kind: the record names the threads the bench ran with.
    res = bench_results(BenchConfig(device="cpu", dtype="float32"), "m", 3, time.perf_counter(), cases=[])
    assert res["record"]["threads"] == 3 == res["threads"]
    assert res["record"]["precision"] == "float32" and res["record"]["device"] == "cpu"
    theory = run_theory(
        TheoryConfig(bound_n=[2], bound_samples=1, n_grid=[8, 16], samples=2, activations=["x"]),
        tmp_path / "t",
        progress=False,
        plots=False,
    )
    written = json.loads((tmp_path / "t" / "results.json").read_text())
    assert written["record"]["precision"] == "fp64" and written["record"]["command"] == sys.argv
    assert theory["record"]["polyattn"] == code_version()["polyattn"]


def test_code_version_without_git_names_no_commit(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # git cannot be found
    code_version.cache_clear()
    try:
        version = code_version()
        assert version["commit"] is None and version["dirty"] is None and version["polyattn"] is not None
    finally:
        code_version.cache_clear()
