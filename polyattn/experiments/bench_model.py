"""``polyattn bench --model NAME``: end-to-end training throughput under each activation and backend.

A model from ``polyattn.create_model`` trains on random images (the data
pipeline is not what is measured) with AdamW and cross-entropy; every
attention layer is switched to one backend, and images per second over the
timed steps are reported against softmax under ``auto`` (which runs SDPA).
The default shape is the paper's Tiny-ImageNet ViT setting: 64x64 images,
patch 4, 256 patches + the class token = 257 tokens, 200 classes.
``amp`` lists the precisions to time, as the trainer's ``train.amp`` names
them: ``auto`` (the default: bf16 where the device computes it natively, else
fp32), ``off`` (fp32), ``bf16`` (autocast: bf16 matrix products in the linear
layers, the attention itself in fp32), ``fp16`` (GPU). Each step is the
trainer's: forward, loss, backward, gradient clipping, AdamW.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.backends import BACKENDS, call_info, choose_backend
from ..core.backends.auto import estimate
from ..core.layers import PolyAttention
from ..core.module import attention_modules
from ..training.config import int_setting, setting, settings_from_dict, subset_of
from ..training.precision import AMP_CHOICES, amp_dtype, resolve_amp
from .bench_common import bench_device, run_bench_kind, time_in_turns
from .report.bench import format_model_table

__all__ = ["ModelBenchConfig", "run_model_bench"]


@dataclass
class ModelBenchConfig:
    model: str = "vit_tiny"
    activations: list[str] = field(default_factory=lambda: ["softmax", "x^3/sqrt(N)"])
    backends: list[str] = setting(
        ["auto", "chunked", "reference"], **subset_of(("auto", *sorted(BACKENDS)), empty=True)
    )
    img_size: int = 64
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 200
    amp: list[str] = setting(["auto"], **subset_of(AMP_CHOICES))
    batch_size: int = int_setting(32)
    steps: int = int_setting(5)
    warmup_steps: int = 1
    device: str = "auto"
    num_threads: int | None = int_setting(None, 0, nullable=True)
    seed: int = 0

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ModelBenchConfig:
        return settings_from_dict(ModelBenchConfig, data, "model bench config")


def _set_backend(model: nn.Module, backend: str) -> int:
    modules = attention_modules(model)
    for _, m in modules:
        m.backend = backend
    return len(modules)


def _attention_shape(model: nn.Module, cfg: ModelBenchConfig) -> tuple[int, int, int] | None:
    for m in model.modules():
        if isinstance(m, PolyAttention):
            tokens = (cfg.img_size // cfg.patch_size) ** 2 + 1
            return m.num_heads, tokens, m.head_dim
    return None


def _make_step(model: nn.Module, cfg: ModelBenchConfig, device: torch.device, amp: str):
    """One training step as the trainer takes it (autocast, fp32 loss, clipping at 1, AdamW) on a fixed batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=g).to(device)
    dtype = amp_dtype(amp)

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    return step


def _runner(
    cfg: ModelBenchConfig, act: str, backend: str, amp: str, device: torch.device
) -> tuple[dict, Callable | None]:
    """The result row of one (activation, backend, amp) and its training step, or None with row["skipped"] set."""
    from ..models import create_model
    from ..utils import seed_everything

    row: dict[str, Any] = {"activation": act, "backend": backend, "amp": amp}
    seed_everything(cfg.seed)
    model = create_model(
        cfg.model,
        activation=act,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
    ).to(device)
    model.train()
    shape = _attention_shape(model, cfg)
    if shape is not None:
        heads, tokens, hd = shape
        meta = torch.empty(cfg.batch_size, heads, tokens, hd, device="meta")
        info = replace(call_info(meta, meta, act, v=meta), device=device)
        name = choose_backend(info).name if backend == "auto" else backend
        row.update(tokens=tokens, heads=heads, head_dim=hd, runs=name)
        why_not = BACKENDS[name].unsupported(info)
        if why_not is None and not math.isfinite(estimate(name, info).seconds):
            why_not = f"cost model: {estimate(name, info).note}"
        if why_not is not None:
            row["skipped"] = why_not
            return row, None
    _set_backend(model, backend)
    return row, _make_step(model, cfg, device, amp)


def _time(runners: list[tuple[dict, Callable]], cfg: ModelBenchConfig, device: torch.device, progress: bool) -> None:
    """Warm-up, then the timed steps in turns (one step of each configuration, then the next), so that
    a busy spell on a shared machine hits all of them; step times and img/s go into the rows."""
    from tqdm import tqdm

    bar = tqdm(
        total=len(runners) * (cfg.warmup_steps + cfg.steps), desc="model bench", disable=not progress, leave=False
    )
    for row, step in runners:
        for _ in range(cfg.warmup_steps):
            step()
            bar.update(1)
        row["step_times_s"] = []
    time_in_turns(runners, cfg.steps, device, tick=lambda: bar.update(1))
    bar.close()
    for row, _ in runners:
        times = row["step_times_s"]
        row["imgs_per_s"] = cfg.batch_size / min(times)
        row["imgs_per_s_median"] = cfg.batch_size / statistics.median(times)


def run_model_bench(cfg: ModelBenchConfig, out_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Train ``cfg.model`` for a few steps under each (activation, backend); returns imgs/s per row."""
    device = bench_device(cfg.device)
    return run_bench_kind(cfg, device, partial(_measure, cfg, device, progress), format_model_table, out_dir)


def _measure(cfg: ModelBenchConfig, device: torch.device, progress: bool) -> dict[str, list[dict]]:
    backends = list(cfg.backends)
    if device.type == "cuda" and "triton" not in backends:
        backends.append("triton")
    # Each setting as the trainer would resolve it on this device; auto beside an explicit twin is timed once.
    precisions = list(dict.fromkeys(resolve_amp(a, device) for a in cfg.amp))
    combos = [
        (a, b, amp)
        for amp in precisions
        for a in cfg.activations
        for b in backends
        if not (b == "triton" and a == "softmax" and b not in cfg.backends)
    ]
    rows, runners = [], []
    try:
        for act, backend, amp in combos:
            row, step = _runner(cfg, act, backend, amp, device)
            rows.append(row)
            if step is not None:
                runners.append((row, step))
        _time(runners, cfg, device, progress)
    finally:
        runners.clear()
    bases = {
        r["amp"]: r for r in rows if r["activation"] == "softmax" and r["backend"] == "auto" and r.get("imgs_per_s")
    }
    for r in rows:
        base = bases.get(r["amp"])  # softmax under auto (SDPA) at the same precision
        if base and r.get("imgs_per_s"):
            r["vs_softmax_auto"] = r["imgs_per_s"] / base["imgs_per_s"]
    return {"rows": rows}
