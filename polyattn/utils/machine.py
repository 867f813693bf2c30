"""What a number was measured on: one description used by every report, table and results file."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

__all__ = ["cpu_name", "machine_info", "machine_line"]


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
    return f"{info['cpu_count']}-core CPU ({info['processor']}), {info['threads']} torch threads, torch {info['torch']}"
