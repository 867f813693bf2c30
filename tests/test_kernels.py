"""The Triton kernels compile for real GPU targets (sm_90, sm_80) without spills, on a machine without a GPU.

Triton compiles a kernel to a cubin for any NVIDIA target with the ptxas it
ships; the cubin's resource table gives registers, spill space and shared
memory. The interpreter tests (test_triton.py) check the arithmetic; this
checks what only hardware would otherwise reveal.
"""

from __future__ import annotations

import argparse
import json
import time

import pytest

from polyattn.commands import kernels as kernels_command
from polyattn.core.backends import kernel_check
from polyattn.core.backends.kernel_check import SHARED_MEMORY_LIMITS, parse_target, problems


def _row(**kw):
    row = {"target": "sm_90", "kernel": "k", "pass": "fwd", "head_dim": 64, "config": "64x64 w4 s3"}
    row.update(registers=128, spill_bytes=0, shared_bytes=1024, compile_s=0.1)
    row.update(kw)
    return row


def test_problems_name_the_configuration_and_the_limit():
    rows = [
        _row(),
        _row(target="sm_80", shared_bytes=SHARED_MEMORY_LIMITS[80] + 1, config="128x128 w8 s3"),
        _row(spill_bytes=96, registers=255, head_dim=128),
        _row(error="CompilationError: bad dot shape", config="16x16 w4 s1"),
    ]
    found = problems(rows)
    assert len(found) == 3
    assert "sm_80" in found[0] and "128x128 w8 s3" in found[0] and str(SHARED_MEMORY_LIMITS[80]) in found[0]
    assert "spills 96 bytes" in found[1] and "head_dim=128" in found[1]
    assert "does not compile" in found[2] and "bad dot shape" in found[2] and "16x16 w4 s1" in found[2]


def test_unknown_target_is_a_clear_error():
    assert parse_target("sm_90") == parse_target("90") == parse_target("SM90") == 90
    with pytest.raises(ValueError, match="unknown GPU target 'sm_75'.*sm_80.*sm_90"):
        parse_target("sm_75")


def _args(**kw):
    base = {"target": ["sm_90"], "out": "unused", "jobs": 1, "quick": True, "no_progress": True}
    return argparse.Namespace(**(base | kw))


def test_command_says_clearly_when_triton_cannot_compile(monkeypatch, capsys):
    monkeypatch.setattr(kernel_check, "triton_missing_reason", lambda: "triton is not installed (pip install x)")
    assert kernels_command.run(_args()) == 2
    assert "cannot compile the kernels: triton is not installed" in capsys.readouterr().err


def test_command_fails_naming_each_bad_configuration(monkeypatch, tmp_path, capsys):
    rows = [_row(), _row(spill_bytes=40, config="32x32 w8 s3", **{"pass": "dkdv"})]
    monkeypatch.setattr(kernel_check, "triton_missing_reason", lambda: None)
    monkeypatch.setattr(kernel_check, "check_kernels", lambda targets, **kw: rows)
    assert kernels_command.run(_args(out=str(tmp_path))) == 1
    captured = capsys.readouterr()
    assert "1 configuration(s) fail" in captured.err and "pass=dkdv" in captured.err and "32x32 w8 s3" in captured.err
    assert "spill B" in captured.out  # the table is printed and written either way
    saved = json.loads((tmp_path / "kernels.json").read_text())
    assert saved["rows"] == rows and len(saved["problems"]) == 1
    monkeypatch.setattr(kernel_check, "check_kernels", lambda targets, **kw: rows[:1])
    assert kernels_command.run(_args(out=str(tmp_path))) == 0


def test_command_rejects_bad_targets_and_jobs(capsys):
    if kernel_check.triton_missing_reason() is not None:
        pytest.skip(f"skipped: {kernel_check.triton_missing_reason()}")
    assert kernels_command.run(_args(target=["sm_70"])) == 2
    assert "unknown GPU target 'sm_70'" in capsys.readouterr().err
    assert kernels_command.run(_args(jobs=0)) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err


def _needs_compiler():
    pytest.importorskip("triton", reason="triton is not installed: the GPU kernels cannot be compiled")
    reason = kernel_check.triton_missing_reason()
    if reason is not None:
        pytest.skip(f"the kernel compile check is skipped: {reason}")


@pytest.mark.parametrize("module", ["triton_kernels", "triton_varlen"])
def test_autotuner_times_exactly_the_checked_launch_configurations(monkeypatch, module):
    _needs_compiler()
    import importlib

    import triton

    from polyattn.core.backends import triton_kernels

    mod = importlib.import_module(f"polyattn.core.backends.{module}")
    union = sorted({c for configs in mod._GPU_CONFIGS.values() for c in configs})
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in union]
    passes = {name: code for code, name in triton_kernels._PASSES.items()}
    for device_arch, generation in ((80, 80), (86, 80), (89, 80), (90, 90), (100, 90)):
        monkeypatch.setattr(mod, "_arch_of", lambda t, a=device_arch: a)
        checked = {}
        for v in mod.compile_variants(arch=device_arch):
            checked[(v.tags["pass"], v.tags["dtype"], v.tags["head_dim"])] = {
                (dict(c.blocks)["BLOCK_M"], dict(c.blocks)["BLOCK_N"], c.num_warps, c.num_stages) for c in v.configs
            }
        for (pass_name, dtype, head_dim), compiled in checked.items():
            kw = {"PASS": passes[pass_name], "LOWP": dtype == "bf16", "BLOCK_D": head_dim, "BLOCK_DV": 16}
            kept = mod._prune(configs, {"Q": None}, **kw)
            timed = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
            # What the autotuner may pick on this GPU is what `polyattn kernels` compiles for its generation.
            assert timed == compiled, (device_arch, pass_name, dtype, head_dim)
            bucket = 64 if head_dim <= 64 else head_dim
            assert compiled == set(mod._GPU_CONFIGS[(generation, pass_name, dtype, bucket)])


def test_every_launch_configuration_compiles_for_sm90_and_sm80_without_spills():
    """The quick set: every pass, dtype and launch configuration once, at its largest head dimension,
    with gelu (the activation with the most registers) and causal masking, for both targets.
    Compiled kernels are cached by Triton on disk; a cold compile takes about a second each."""
    _needs_compiler()
    todo = {arch: kernel_check.variants(arch, quick=True) for arch in (90, 80)}
    assert {v.tags["pass"] for v in todo[90]} == {"fwd", "dq", "dkdv"}
    assert {v.tags["dtype"] for v in todo[80]} == {"bf16", "fp32"}
    t0 = time.perf_counter()
    rows = kernel_check.check_kernels([90, 80], quick=True, jobs=2)
    elapsed = time.perf_counter() - t0
    assert len(rows) == sum(len(v.configs) for vs in todo.values() for v in vs)
    bad = problems(rows)
    assert not bad, "\n".join(bad)
    assert all(r["registers"] <= 255 and r["shared_bytes"] > 0 for r in rows)
    # Compile time stays a small part of CI: about a second a kernel on one core when nothing is cached.
    assert elapsed < 3.0 * len(rows), f"{len(rows)} compiles took {elapsed:.0f} s"
