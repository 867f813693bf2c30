"""What a number was measured on: one description used by every report, table and results file."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

__all__ = ["cpu_bf16_native", "cpu_class", "cpu_name", "machine_info", "machine_line"]


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Platform, CPU, core count, torch threads, Python, torch and the GPU (None without one)."""
    return {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_class": cpu_class(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_line(device: str = "cpu") -> str:
    """One line for tables: the GPU on ``device="cuda"`` (when there is one), else the CPU and its threads."""
    info = machine_info()
    if device == "cuda" and info["cuda"]:
        return f"{info['cuda']} (torch {info['torch']})"
    return (
        f"{info['cpu_count']}-core CPU ({info['processor']}; {info['cpu_class']}), {info['threads']} torch threads, "
        f"torch {info['torch']}"
    )


def _arm_cpu_flags() -> set[str]:
    """The CPU feature words Linux reports on ARM (empty elsewhere or when unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _macos_arm_bf16() -> bool:
    import subprocess

    try:
        out = subprocess.run(
            ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip() == "1"


def cpu_bf16_native() -> bool:
    """Whether torch's CPU kernels compute bf16 with bf16 instructions rather than by emulation.

    x86: AVX-512 BF16 or AMX, and torch's kernels dispatched at AVX-512 (``ATEN_CPU_CAPABILITY=avx2``
    caps them, and then bf16 is emulated like on an AVX2-only CPU). ARM: the bf16 feature (ARMv8.6).
    """
    capability = torch.backends.cpu.get_cpu_capability()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(hardware) and "AVX512" in capability
    if machine in ("arm64", "aarch64"):
        if platform.system() == "Darwin":
            return _macos_arm_bf16()
        return "bf16" in _arm_cpu_flags()
    return False


def cpu_class() -> str:
    """A short name for what decides CPU speed here: torch's kernel level and native bf16 support,
    e.g. ``AVX512, native bf16`` or ``AVX2, bf16 emulated``; every stated CPU time should name it."""
    bf16 = "native bf16" if cpu_bf16_native() else "bf16 emulated"
    return f"{torch.backends.cpu.get_cpu_capability()}, {bf16}"
