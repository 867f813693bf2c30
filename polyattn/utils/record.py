"""The run record: what produced a result file, written the same way by every command.

``run_record()`` names the polyattn version and git commit (when run from a checkout), Python, torch and
the libraries that change numbers, the machine (CPU class or GPU), the torch threads in force, the
command line, and optionally the run's device, precision and the backend ``auto`` chose per attention
module (:class:`BackendRecorder`). Train writes it to ``summary.json`` and the checkpoint; compare,
sweep, recall, bench and theory to their ``results.json``.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .machine import machine_info

__all__ = ["BackendRecorder", "code_version", "library_versions", "run_facts", "run_record", "runs_digest"]

# Libraries whose versions change numbers or speed; read from package metadata, never imported.
_LIBRARIES = ("numpy", "timm", "torchvision", "transformers", "triton")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that matter here (None: not installed)."""
    return {name: _version(name) for name in _LIBRARIES}


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """polyattn's version, and the commit (with whether the tree had uncommitted changes) of a checkout.

    An installed wheel has no checkout: commit and dirty are None then.
    """
    root = Path(__file__).resolve().parents[2]  # the directory holding the polyattn package
    commit = dirty = None
    if (root / ".git").exists() and _git(root, "rev-parse", "--is-inside-work-tree") == "true":
        commit = _git(root, "rev-parse", "HEAD")
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    return {"polyattn": _version("polyattn"), "commit": commit, "dirty": dirty}


def run_record(
    device: str | torch.device | None = None,
    precision: str | None = None,
    backends: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The record of one run, taken inside it (so ``threads`` are the torch threads the run used).

    ``device``: where it ran; ``precision``: the resolved amp (off/bf16/fp16); ``backends``:
    attention module name -> the backend it ran (see :class:`BackendRecorder`). ``extra`` keys are added.
    """
    machine = machine_info()
    dev = None if device is None else str(device)
    on_gpu = dev is not None and dev.startswith("cuda") and machine["cuda"]
    record: dict[str, Any] = {
        **code_version(),
        "python": machine["python"],
        "torch": machine["torch"],
        "libraries": library_versions(),
        "device": dev,
        "hardware": machine["cuda"] if on_gpu else f"{machine['processor']} ({machine['cpu_class']})",
        "cpu_class": machine["cpu_class"],
        "gpu": machine["cuda"],
        "threads": torch.get_num_threads(),
        "precision": precision,
        "backends": backends,
        "command": list(sys.argv),
    }
    record.update(extra)
    return record


class BackendRecorder:
    """Records, on each attention module's first call, the backend it runs: its ``backend`` when set,
    else what ``auto`` chooses for the real inputs (:func:`polyattn.core.backends.select_backend`).

    Attach before the first forward and :meth:`detach` after it; :attr:`chosen` maps module name -> backend.
    Observers see q and k; v is taken to have k's shape, as in every polyattn model.
    """

    def __init__(self, model: nn.Module) -> None:
        from ..core.backends import select_backend
        from ..core.module import attention_modules, module_activation

        self._select, self._activation = select_backend, module_activation
        self.chosen: dict[str, str] = {}
        self._modules = attention_modules(model)
        self._names = {id(m): name for name, m in self._modules}
        for _, m in self._modules:
            m.attention_observers.append(self._observe)

    def _observe(self, module, q, k, attn_mask, bias, causal, scale) -> None:
        name = self._names.get(id(module))
        if name is None or name in self.chosen:
            return
        backend = getattr(module, "backend", "auto")
        if backend == "auto":
            drop = module._attn_dropout_p() if hasattr(module, "_attn_dropout_p") else 0.0
            try:
                backend = self._select(
                    q, k, self._activation(module), attn_mask=attn_mask, bias=bias, causal=causal, dropout_p=drop
                ).name
            except (ValueError, TypeError) as e:  # the attention itself will raise the clear error
                backend = f"auto (not chosen: {str(e).splitlines()[0][:120]})"
        self.chosen[name] = backend

    @property
    def done(self) -> bool:
        return len(self.chosen) == len(self._modules)

    def detach(self) -> None:
        for _, m in self._modules:
            if self._observe in m.attention_observers:
                m.attention_observers.remove(self._observe)


def _distinct(values) -> list:
    return sorted({v for v in values if v is not None}, key=str)


def runs_digest(rows: list[dict]) -> dict[str, list]:
    """What the runs of a grid ran with, each value once: their threads, precisions and backends.

    ``rows``: per-run dicts with ``threads``, ``precision`` and ``backends`` (a list of backend names).
    """
    return {
        "threads_per_run": _distinct(r.get("threads") for r in rows),
        "precision_per_run": _distinct(r.get("precision") for r in rows),
        "backends": _distinct(b for r in rows for b in (r.get("backends") or ())),
    }


def run_facts(summary: dict) -> dict[str, Any]:
    """The record fields a grid keeps per run, from a training run's summary (None for runs before records)."""
    record = summary.get("record") or {}
    backends = record.get("backends")
    return {
        "threads": record.get("threads"),
        "precision": record.get("precision"),
        "backends": None if backends is None else _distinct(backends.values()),
    }
