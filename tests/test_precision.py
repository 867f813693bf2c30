"""train.amp=auto: bf16 where the device computes it natively, fp32 elsewhere; what runs record; the estimate."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from synthetic_setting import SMALL, small_cfg

import polyattn.training.precision as precision
import polyattn.utils.machine as machine
from polyattn.cli import main
from polyattn.training import load_config, train
from polyattn.training.estimate import GridClock, grid_seconds, probe_run
from polyattn.training.precision import legacy_auto, resolve_amp, resolve_run_precision
from polyattn.utils.rundir import RunDirError


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set what the CPU reports: cpu_bf16(True) = native bf16, cpu_bf16(False) = emulated."""

    def set_native(native: bool) -> None:
        monkeypatch.setattr(precision, "cpu_bf16_native", lambda: native)
        monkeypatch.setattr(machine, "cpu_bf16_native", lambda: native)

    monkeypatch.setattr(precision, "_warned", False)
    return set_native


def test_auto_follows_what_the_cpu_computes_natively(cpu_bf16):
    cpu_bf16(False)
    assert resolve_amp("auto", "cpu") == "off"
    cpu_bf16(True)
    assert resolve_amp("auto", "cpu") == "bf16"
    # explicit settings are kept as asked
    assert resolve_amp("off", "cpu") == "off"
    assert resolve_amp("bf16", "cpu") == "bf16"


def test_auto_on_a_cuda_device_follows_torch_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", torch.device("cuda", 0)) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", torch.device("cuda", 0)) == "off"
    assert resolve_amp("fp16", torch.device("cuda", 0)) == "fp16"


def test_fp16_on_cpu_and_unknown_settings_are_refused():
    from polyattn.training.config import ConfigError

    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_amp("fp16", "cpu")
    with pytest.raises(ConfigError, match="train.amp must be one of"):
        resolve_amp("fp8", "cpu")


def test_cpu_detection_reads_torch_and_the_kernel_level(monkeypatch):
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert machine.cpu_bf16_native()
    assert machine.cpu_class() == "AVX512, native bf16"
    # ATEN_CPU_CAPABILITY=avx2 caps torch's kernels: bf16 is emulated again
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not machine.cpu_bf16_native()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert not machine.cpu_bf16_native()
    assert machine.cpu_class() == "AVX512, bf16 emulated"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert machine.cpu_bf16_native()
    # ARM: the kernel's feature list
    monkeypatch.setattr(machine.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(machine.platform, "system", lambda: "Linux")
    monkeypatch.setattr(machine, "_arm_cpu_flags", lambda: {"fp", "asimd", "bf16"})
    assert machine.cpu_bf16_native()
    monkeypatch.setattr(machine, "_arm_cpu_flags", lambda: {"fp", "asimd"})
    assert not machine.cpu_bf16_native()


def test_explicit_bf16_on_an_emulating_cpu_warns_once(cpu_bf16):
    cpu_bf16(False)
    with pytest.warns(UserWarning, match=r"emulates bf16.*train.amp=off"):
        assert resolve_amp("bf16", "cpu") == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_amp("bf16", "cpu")  # once per process
    cpu_bf16(True)
    precision._warned = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_amp("bf16", "cpu")  # native: nothing to say


@pytest.mark.parametrize("native", [False, True])
def test_a_run_records_the_precision_it_resolved(tmp_path, cpu_bf16, native, capsys):
    cpu_bf16(native)
    out = tmp_path / "run"
    summary = train(small_cfg("train.epochs=1", "train.amp=auto"), out, progress=True)
    expected = "bf16" if native else "off"
    assert load_config(out / "config.yaml")["train"]["amp"] == expected
    assert summary["amp"] == ("bfloat16" if native else None)
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["config"]["train"]["amp"] == expected
    err = capsys.readouterr().err
    assert ("precision: bf16 autocast (attention in fp32)" if native else "precision: fp32") in err
    assert "(train.amp=auto; CPU " in err


def test_resume_compares_what_auto_resolved_to(tmp_path, cpu_bf16, capsys):
    cpu_bf16(True)
    out = tmp_path / "run"
    train(small_cfg("train.epochs=1"), out, progress=False)
    # The same machine: auto resolves as before, the resume extends the run.
    assert main(["train", "--resume", str(out), "--set", "train.epochs=2", "--no-progress"]) == 0
    # A machine where auto means fp32: refused, naming the setting that continues the run.
    cpu_bf16(False)
    with pytest.raises(RunDirError, match=r"train.amp: 'bf16' -> 'off'[\s\S]*--set train.amp=bf16"):
        train(small_cfg("train.epochs=3"), out, resume=True, progress=False)
    with pytest.warns(UserWarning, match="emulates bf16"):
        train(small_cfg("train.epochs=3", "train.amp=bf16"), out, resume=True, progress=False)


def test_configs_written_before_resolution_read_auto_by_its_old_meaning():
    cfg = small_cfg("train.amp=auto")
    assert legacy_auto(cfg)["train"]["amp"] == "off"  # then: bf16 on a GPU that has it, fp32 elsewhere
    resolved = small_cfg("train.amp=bf16")
    assert legacy_auto(resolved) is resolved


def test_compare_records_the_resolved_precision(tmp_path, cpu_bf16, capsys):
    from test_compare import compare_cli

    cpu_bf16(False)
    out = tmp_path / "cmp"
    assert compare_cli(out, acts="softmax", seeds="1") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["amp"] == "off" and results["settings"]["amp_setting"] == "auto"
    assert results["base_config"]["train"]["amp"] == "off"
    assert "Precision: fp32 (train.amp=auto)." in (out / "report.md").read_text()
    assert yaml.safe_load((out / "runs" / "softmax-s0" / "config.yaml").read_text())["train"]["amp"] == "off"
    # resumed on a machine where auto means bf16: refused, with the way to continue
    cpu_bf16(True)
    assert compare_cli(out, "--resume", acts="softmax", seeds="1") == 2
    err = capsys.readouterr().err
    assert "train.amp: 'off' (on disk) vs 'bf16' (now)" in err and "--set train.amp=<the value on disk>" in err


def test_grid_duration_estimates():
    assert grid_seconds([10, 10, 10], 2) == 20
    assert grid_seconds([30, 10, 10, 10], 2) == 30
    assert grid_seconds([5], 4) == 5
    est = probe_run(resolve_run_precision(load_config(None, [*SMALL, "train.epochs=2", "diagnostics.every=2"])))
    assert est.step_s > 0 and est.record_s >= 0
    assert est.steps == 8 and est.recordings == 4 and est.eval_examples == 2 * 30
    assert est.seconds >= est.steps * est.step_s
    clock = GridClock({"a": (3, 6.0), "b": (3, 12.0)}, jobs=1, startup_s=1.0)
    assert clock.initial() == 19.0
    assert clock.epoch("a", 1, 9.0) is None  # a first epoch holds the run's start: not a pace
    line = clock.epoch("a", 2, 3.0)  # a runs at 1.5x its estimate: so will b
    assert line is not None and "after a measured epoch (3.0 s)" in line
    assert line.endswith("21 s left")  # a's last epoch (3 s) and b's three (18 s), one at a time
    assert clock.epoch("a", 3, 3.0) is None  # refined once


def test_compare_prints_its_estimate_and_the_refinement(tmp_path, capsys):
    from test_compare import TINY

    argv = ["compare", "--out", str(tmp_path / "c"), "--activations", "softmax", "--seeds", "1", "--epochs", "2"]
    # two whole epochs of the tiny model: the pace is read from a run's second epoch
    assert main([*argv, "--jobs", "1", "--set", *TINY, "train.max_steps=null"]) == 0
    err = capsys.readouterr().err
    assert "estimated duration on this machine (" in err and "a training step measured at" in err
    assert "after a measured epoch (" in err


def test_a_cuda_device_without_a_gpu_is_a_config_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--set", *SMALL, "train.device=cuda", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "train.device=cuda but torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
