"""``train.amp``: which precision a run computes in, decided once per run by what the device does natively.

``auto`` is bf16 autocast where the device has bf16 arithmetic (a CUDA GPU that supports it; a CPU with
AVX-512 BF16 or AMX, or ARM's bf16) and fp32 elsewhere: on a CPU that emulates bf16 (AVX2 only, most
laptops and many servers) bf16 autocast makes a small model's step several times slower, not faster.
A run records the resolved value (``off``, ``bf16`` or ``fp16``), never ``auto``: its config.yaml then
says what ran, and a resume compares like with like.
"""

from __future__ import annotations

import warnings

import torch

from ..utils.machine import cpu_bf16_native, cpu_class
from .config import ConfigError, check_amp_device

__all__ = [
    "AMP_CHOICES",
    "PRECISION_WORDS",
    "amp_dtype",
    "device_bf16_native",
    "legacy_auto",
    "precision_line",
    "resolve_amp",
    "resolve_run_precision",
    "run_device",
    "silence_emulation_warning",
]

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
# What each resolved setting computes in, as the start line, the grid estimate and the reports say it.
PRECISION_WORDS = {
    "off": "fp32",
    "bf16": "bf16 autocast (attention in fp32)",
    "fp16": "fp16 autocast + gradient scaler",
}
_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_warned = False


def device_bf16_native(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_native()
    return False


def resolve_amp(setting: str, device: torch.device | str, warn: bool = True) -> str:
    """``off``, ``bf16`` or ``fp16`` for a ``train.amp`` setting on ``device``.

    An explicit ``bf16`` on a CPU that emulates it runs as asked, with one warning per process
    naming the slowdown and the fix.
    """
    device = torch.device(device)
    if setting not in AMP_CHOICES:
        raise ConfigError(f"train.amp must be one of {list(AMP_CHOICES)}, got {setting!r}")
    if setting == "auto":
        return "bf16" if device_bf16_native(device) else "off"
    check_amp_device(setting, device.type)
    if setting == "bf16" and device.type == "cpu" and warn and not cpu_bf16_native():
        _warn_emulated()
    return setting


def _warn_emulated() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"train.amp=bf16 on a CPU without bf16 instructions ({cpu_class()}): torch emulates bf16 here, "
        "which makes training several times slower than fp32; set train.amp=off (or auto, which picks "
        "fp32 on this CPU)",
        UserWarning,
        stacklevel=3,
    )


def silence_emulation_warning() -> None:
    """For worker processes of a grid: the parent has already warned once for all of them."""
    global _warned
    _warned = True


def amp_dtype(resolved: str) -> torch.dtype | None:
    """The autocast dtype of a resolved setting (None = fp32, no autocast)."""
    return _DTYPES[resolved]


def precision_line(setting: str, resolved: str, device: torch.device | str) -> str:
    """One line for the start of a run, e.g. ``precision: fp32 (train.amp=auto; CPU AVX2, bf16 emulated)``."""
    device = torch.device(device)
    where = f"CPU {cpu_class()}" if device.type == "cpu" else str(device)
    return f"precision: {PRECISION_WORDS[resolved]} (train.amp={setting}; {where})"


def run_device(preference: str) -> torch.device:
    """The device a run with ``train.device=preference`` trains on (as the trainer picks it)."""
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_run_precision(cfg: dict, warn: bool = True) -> dict:
    """A resolved config with ``train.amp`` resolved for the device the run will train on (a new dict)."""
    train = cfg["train"]
    return {**cfg, "train": {**train, "amp": resolve_amp(train["amp"], run_device(train["device"]), warn=warn)}}


def legacy_auto(cfg: dict) -> dict:
    """A config written before runs recorded their resolved precision: its ``auto`` meant bf16 on a GPU
    that supports it and fp32 everywhere else (a new dict; other configs are returned as they are)."""
    train = cfg.get("train")
    if not isinstance(train, dict) or train.get("amp") != "auto":
        return cfg
    device = run_device(train.get("device", "auto"))
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return {**cfg, "train": {**train, "amp": "bf16" if gpu_bf16 else "off"}}
