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
from typing import Any

import torch
import torch.nn.functional as F

from ..core.activations import get_activation
from ..core.decode import LinearState
from ..core.functional import attention
from ..training.config import int_setting, ints_at_least, setting, settings_from_dict, specs_setting
from ..utils.machine import machine_line
from .bench import bench_results, write_bench_dir

__all__ = ["DecodeBenchConfig", "format_decode_table", "run_decode_bench"]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DecodeBenchConfig:
    contexts: list[int] = setting([1024, 4096, 16384, 65536], **ints_at_least(1))
    activations: list[str] = specs_setting(["x/sqrt(N)", "x^2/sqrt(N)"])
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
        for spec in cfg.activations:
            if not get_activation(spec).is_polynomial:
                raise ValueError(f"--decode compares x^p activations with softmax, got {spec!r}; e.g. x^2/sqrt(N)")
        return cfg


def _device(cfg: DecodeBenchConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


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
    _sync(device)
    t0 = time.perf_counter()
    state, _ = LinearState.prefill(*prompt, spec)
    _sync(device)
    prefill = time.perf_counter() - t0
    # Each call decodes the next token (L + 1, L + 2, ...): a state step costs the same at any length.
    return lambda: state.step(q, k, v), state.nbytes, prefill


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_decode_bench(cfg: DecodeBenchConfig, out_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Time one decoding step per (context, method); returns the rows also written to ``out_dir``."""
    from tqdm.auto import tqdm

    device = _device(cfg)
    dtype = _DTYPES[cfg.dtype]
    old_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t_start = time.perf_counter()
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
                for _ in range(cfg.steps):  # in turns, so that a busy spell hits every row
                    for row, step in group:
                        _sync(device)
                        t0 = time.perf_counter()
                        step()
                        _sync(device)
                        row["step_times_s"].append(time.perf_counter() - t0)
                for row, _ in group:
                    row["tokens_per_s"] = cfg.batch / min(row["step_times_s"])
                    rows.append(row)
                    bar.update(1)
                group.clear()
        machine = machine_line(device.type)
    finally:
        bar.close()
        torch.set_num_threads(old_threads)
    base = {r["context"]: r for r in rows if r["activation"] == "softmax"}
    for r in rows:
        r["vs_softmax"] = r["tokens_per_s"] / base[r["context"]]["tokens_per_s"]
    results = bench_results(cfg, machine, cfg.num_threads or old_threads, t_start, rows=rows)
    if out_dir is not None:
        out = write_bench_dir(out_dir, cfg, results, format_decode_table(results))
        results["plots"] = [str(_plot(results, out / "decode.png"))]
    return results


def format_decode_table(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"polyattn bench --decode on {results['machine']}",
        f"one attention layer: batch {cfg['batch']}, {cfg['heads']} heads, d = {cfg['d']}, {cfg['dtype']}; "
        f"next-token step, fastest of {cfg['steps']} (in turns), {cfg['warmup']} warm-up",
        "",
        f"{'context':>8} {'activation':<14} {'method':<9} {'tokens/s':>10} {'vs softmax':>11} {'memory':>10} "
        f"{'prefill':>9}",
    ]
    for r in results["rows"]:
        prefill = f"{r['prefill_s']:.2f} s" if "prefill_s" in r else "-"
        lines.append(
            f"{r['context']:>8} {r['activation']:<14} {r['method']:<9} {r['tokens_per_s']:>10.0f} "
            f"{r['vs_softmax']:>10.2f}x {_mib(r['bytes']):>10} {prefill:>9}"
        )
    lines.append(f"\nelapsed {results['elapsed_s']:.0f} s")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _plot(results: dict, path: os.PathLike) -> os.PathLike:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    series: dict[str, list[dict]] = {}
    for r in results["rows"]:
        series.setdefault(f"{r['activation']} ({r['method']})", []).append(r)
    for name, rs in series.items():
        xs = [r["context"] for r in rs]
        style = "--" if "kv-cache" in name else "-"
        ax_t.plot(xs, [r["tokens_per_s"] for r in rs], style, marker="o", label=name)
        ax_m.plot(xs, [r["bytes"] / 2**20 for r in rs], style, marker="o", label=name)
    for ax, label in ((ax_t, "tokens/s (one layer)"), (ax_m, "memory kept between tokens (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(results["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
