"""``polyattn bench --decode``: tokens/s and memory of one decoding step, KV cache against LinearState.

For each context length L (tokens already generated), one attention layer of ``heads`` heads
generates the next token of ``batch`` sequences:

- ``softmax`` (KV cache): SDPA of the new query against the L + 1 cached keys and values, after
  writing the new key and value into a preallocated cache (what an HF-style cache does per token);
- ``<spec> (KV cache)`` for each x^p activation: the same step through :func:`polyattn.attention`,
  so the cost of polynomial attention decoded like softmax is on the table too;
- ``<spec> (state)``: :meth:`polyattn.LinearState.step` (each call the next token), prefilled with
  an L-token prompt (its time is ``prefill_s``: the exact linear form is also how a long prompt is read).

Memory is the bytes the layer keeps between tokens: 2 (L + 1) d numbers per head and sequence for
the cache, F dv numbers and one count for the state (F = C(d + p - 1, p)), from the tensors themselves.
Times are the fastest of ``steps`` steps after ``warmup`` (steps of all rows of one L in turns).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.activations import get_activation
from ..core.decode import LinearState
from ..core.functional import attention
from ..training.config import int_setting, ints_at_least, setting, settings_from_dict, specs_setting
from .bench_common import DTYPES as _DTYPES
from .bench_common import bench_device, run_bench_kind, sync, time_in_turns
from .report.bench import format_decode_table, plot_decode

__all__ = ["DecodeBenchConfig", "run_decode_bench"]


def decode_contexts() -> Any:
    """The settings field of the context lengths both decode benches (--decode, --decode --hf) sweep."""
    return setting([1024, 4096, 16384, 65536], **ints_at_least(1))


def decode_specs() -> Any:
    """The settings field of the x^p activations both decode benches compare with softmax."""
    return specs_setting(["x/sqrt(N)", "x^2/sqrt(N)"])


def check_polynomial(specs: list[str], what: str) -> None:
    """Decoding from a fixed-size state needs x^p: a ValueError naming ``what`` for any other activation."""
    for spec in specs:
        if not get_activation(spec).is_polynomial:
            raise ValueError(f"{what} compares x^p activations with softmax, got {spec!r}; e.g. x^2/sqrt(N)")


@dataclass
class DecodeBenchConfig:
    contexts: list[int] = decode_contexts()
    activations: list[str] = decode_specs()
    heads: int = int_setting(8)
    d: int = int_setting(64)
    batch: int = int_setting(1)
    steps: int = int_setting(20)
    warmup: int = int_setting(3, 0)
    device: str = "auto"
    dtype: str = setting("float32", choices=tuple(_DTYPES))
    num_threads: int | None = int_setting(None, 0, nullable=True)
    seed: int = 0

    @staticmethod
    def from_dict(data: dict[str, Any]) -> DecodeBenchConfig:
        cfg = settings_from_dict(DecodeBenchConfig, data, "decode bench config")
        check_polynomial(cfg.activations, "--decode")
        return cfg


def _cache_step(
    cfg: DecodeBenchConfig, length: int, spec: str, device: torch.device, dtype: torch.dtype
) -> tuple[Callable[[], torch.Tensor], int]:
    """A KV-cache decoding step at context ``length`` and the bytes the cache holds."""
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    shape = (cfg.batch, cfg.heads, length + 1, cfg.d)
    keys, values = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    q, k, v = (torch.randn(cfg.batch, cfg.heads, 1, cfg.d, generator=g).to(device, dtype) for _ in range(3))

    def step() -> torch.Tensor:
        keys[:, :, length : length + 1].copy_(k)
        values[:, :, length : length + 1].copy_(v)
        if spec == "softmax":
            return F.scaled_dot_product_attention(q, keys, values)
        return attention(q, keys, values, spec)  # one query row sees every cached key: no mask needed

    return step, keys.nbytes + values.nbytes


def _state_step(
    cfg: DecodeBenchConfig, length: int, spec: str, device: torch.device, dtype: torch.dtype
) -> tuple[Callable[[], torch.Tensor], int, float]:
    """A LinearState decoding step after an L-token prompt, the state's bytes and the prefill time."""
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    prompt = [torch.randn(cfg.batch, cfg.heads, length, cfg.d, generator=g).to(device, dtype) for _ in range(3)]
    q, k, v = (torch.randn(cfg.batch, cfg.heads, 1, cfg.d, generator=g).to(device, dtype) for _ in range(3))
    sync(device)
    t0 = time.perf_counter()
    state, _ = LinearState.prefill(*prompt, spec)
    sync(device)
    prefill = time.perf_counter() - t0
    # Each call decodes the next token (L + 1, L + 2, ...): a state step costs the same at any length.
    return lambda: state.step(q, k, v), state.nbytes, prefill


def run_decode_bench(cfg: DecodeBenchConfig, out_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Time one decoding step per (context, method); returns the rows also written to ``out_dir``."""
    device = bench_device(cfg.device)
    return run_bench_kind(cfg, device, partial(_measure, cfg, device, progress), format_decode_table, out_dir, _plot)


def _plot(results: dict, out: Path) -> list[Path]:
    return [
        plot_decode(results, out / "decode.png", "bytes", "tokens/s (one layer)", "memory kept between tokens (MiB)")
    ]


def _measure(cfg: DecodeBenchConfig, device: torch.device, progress: bool) -> dict[str, list[dict]]:
    from tqdm.auto import tqdm

    dtype = _DTYPES[cfg.dtype]
    methods = [("softmax", "kv-cache")]
    methods += [(get_activation(a).spec, kind) for a in cfg.activations for kind in ("kv-cache", "state")]
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(cfg.contexts) * len(methods), desc="decode bench", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for length in cfg.contexts:
                group = []
                for spec, kind in methods:
                    row: dict[str, Any] = {"context": int(length), "activation": spec, "method": kind}
                    if kind == "kv-cache":
                        step, row["bytes"] = _cache_step(cfg, int(length), spec, device, dtype)
                    else:
                        step, row["bytes"], row["prefill_s"] = _state_step(cfg, int(length), spec, device, dtype)
                    for _ in range(cfg.warmup):
                        step()
                    row["step_times_s"] = []
                    group.append((row, step))
                time_in_turns(group, cfg.steps, device)
                for row, _ in group:
                    row["tokens_per_s"] = cfg.batch / min(row["step_times_s"])
                    rows.append(row)
                    bar.update(1)
                group.clear()
    finally:
        bar.close()
    base = {r["context"]: r for r in rows if r["activation"] == "softmax"}
    for r in rows:
        r["vs_softmax"] = r["tokens_per_s"] / base[r["context"]]["tokens_per_s"]
    return {"rows": rows}
