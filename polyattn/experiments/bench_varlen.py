"""``polyattn bench --varlen``: packed documents three ways, time and peak memory of forward + backward.

One attention layer over ``lengths`` documents (default 8 of 256..4096 tokens, in mixed order),
``heads`` heads of dimension d, causal by default (language-model training):

- ``packed``: :func:`polyattn.attention_varlen` on the (total, H, d) tensors and cu_seqlens
  (``backend`` as chosen by auto, named in the table);
- ``padded``: :func:`polyattn.attention` on (docs, H, longest, d) with a key-padding mask;
- ``block mask``: :func:`polyattn.attention` on one (1, H, total, d) row with the (total, total)
  block-diagonal bool mask, the only way to pack before ``attention_varlen``;

for each x^p activation, against softmax: ``F.scaled_dot_product_attention`` with the block mask,
polyattn's packed softmax, and ``torch.nn.attention.varlen.varlen_attn`` where the installed torch
has it and runs it on the device (flash kernels: CUDA only).

Times are the fastest of ``repeats`` forward + backward runs after one warm-up. Peak memory is the
extra memory a case allocates: on CPU the peak resident set of a worker process that runs the cases
one at a time (Linux /proc, as ``polyattn bench``), on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..core.activations import get_activation
from ..core.functional import attention
from ..core.varlen import attention_varlen, select_backend_varlen
from ..training.config import int_setting, ints_at_least, setting, settings_from_dict, specs_setting
from ..utils.machine import machine_line
from .bench import _proc_status, _rss_peak_supported, bench_results, write_bench_dir

__all__ = ["VarlenBenchConfig", "format_varlen_table", "run_varlen_bench"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = ("packed", "padded", "block mask")


@dataclass
class VarlenBenchConfig:
    lengths: list[int] = setting([1024, 256, 4096, 512, 2048, 768, 3072, 1536], **ints_at_least(1))
    activations: list[str] = specs_setting(["x^3/sqrt(N)", "x^2/sqrt(N)"])
    heads: int = int_setting(4)
    d: int = int_setting(64)
    causal: bool = True
    repeats: int = int_setting(3)
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))
    dtype: str = setting("float32", choices=tuple(_DTYPES))
    num_threads: int | None = int_setting(None, 0, nullable=True)
    memory: bool = True
    seed: int = 0

    @staticmethod
    def from_dict(data: dict[str, Any]) -> VarlenBenchConfig:
        cfg = settings_from_dict(VarlenBenchConfig, data, "varlen bench config")
        for spec in cfg.activations:
            get_activation(spec)  # a clear error for a malformed spec
        return cfg


def _device(cfg: VarlenBenchConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(cfg.device)


def _cu(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _block_mask(lengths: list[int], causal: bool, device: torch.device) -> torch.Tensor:
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    mask = doc[:, None] == doc[None, :]
    return mask.tril_() if causal else mask


def _torch_varlen() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def cases(cfg: VarlenBenchConfig) -> list[dict[str, str]]:
    """Every (activation, layout, method) row of the bench, in order."""
    rows = [{"activation": get_activation(a).spec, "layout": lay, "method": "polyattn"} for a in cfg.activations
            for lay in LAYOUTS]  # fmt: skip
    rows.append({"activation": "softmax", "layout": "packed", "method": "polyattn"})
    rows.append({"activation": "softmax", "layout": "block mask", "method": "sdpa"})
    rows.append({"activation": "softmax", "layout": "packed", "method": "torch varlen_attn"})
    return rows


def _make_case(case: dict[str, str], cfg: VarlenBenchConfig, device: torch.device):
    """(fn, inputs, note): fn(q, k, v) -> out, its inputs (q, k, v requiring grad, and dO)."""
    g = torch.Generator().manual_seed(cfg.seed)
    dtype = _DTYPES[cfg.dtype]
    lengths, h, d, causal = [int(n) for n in cfg.lengths], cfg.heads, cfg.d, cfg.causal
    total, longest = sum(lengths), max(lengths)
    spec, layout, method = case["activation"], case["layout"], case["method"]

    def make(*shape):
        ts = [torch.randn(*shape, generator=g).to(device=device, dtype=dtype) for _ in range(4)]
        return (*(t.requires_grad_() for t in ts[:3]), ts[3])

    if layout == "packed":
        cu = _cu(lengths, device)
        inputs = make(total, h, d)
        if method == "torch varlen_attn":
            fn_varlen = _torch_varlen()
            if fn_varlen is None:
                raise RuntimeError("this torch has no torch.nn.attention.varlen.varlen_attn")
            if device.type != "cuda":
                raise RuntimeError("not run: torch's varlen_attn calls flash-attention kernels, CUDA only")
            window = (-1, 0) if causal else (-1, -1)
            return (lambda q, k, v: fn_varlen(q, k, v, cu, cu, longest, longest, window_size=window)), inputs, ""
        choice = select_backend_varlen(inputs[0], inputs[1], spec, cu, v=inputs[2], causal=causal)
        fn = lambda q, k, v: attention_varlen(q, k, v, cu, activation=spec, causal=causal)  # noqa: E731
        return fn, inputs, f"auto: {choice.name}"
    if layout == "padded":
        keep = torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        pad = keep[:, None, None, :]
        inputs = make(len(lengths), h, longest, d)
        return (lambda q, k, v: attention(q, k, v, spec, attn_mask=pad, causal=causal)), inputs, ""
    mask = _block_mask(lengths, causal, device)
    inputs = make(1, h, total, d)
    if method == "sdpa":
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), inputs, ""
    return (lambda q, k, v: attention(q, k, v, spec, attn_mask=mask)), inputs, ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(fn, q, k, v, do, device: torch.device) -> float:
    q.grad = k.grad = v.grad = None
    _sync(device)
    t0 = time.perf_counter()
    fn(q, k, v).backward(do)
    _sync(device)
    return time.perf_counter() - t0


def _memory_worker() -> None:
    """Reads {config, cases} as JSON from stdin; prints one JSON line of peak extra bytes per case."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: large blocks are mmapped and returned at once
    job = json.loads(sys.stdin.read())
    cfg = VarlenBenchConfig(**job["config"])
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device("cpu")
    small = VarlenBenchConfig(**{**job["config"], "lengths": [16, 8]})
    for case in job["cases"]:
        try:
            fn, inputs, _ = _make_case(case, small, device)  # first calls allocate pools: unmeasured
            fn(*inputs[:3]).backward(inputs[3])
            fn, inputs, _ = _make_case(case, cfg, device)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _proc_status()["VmRSS"]
            fn(*inputs[:3]).backward(inputs[3])
            row = {"peak_bytes": max(_proc_status()["VmHWM"] - base, 0)}
        except Exception as e:  # report, keep measuring the rest
            row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        inputs = fn = None
        print(json.dumps(row), flush=True)


def _measure_memory(rows: list[dict], cfg: VarlenBenchConfig, device: torch.device) -> list[dict]:
    todo = [{k: r[k] for k in ("activation", "layout", "method")} for r in rows]
    if device.type == "cuda":
        out = []
        for case in todo:
            try:
                fn, inputs, _ = _make_case(case, cfg, device)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn(*inputs[:3]).backward(inputs[3])
                torch.cuda.synchronize()
                out.append({"peak_bytes": torch.cuda.max_memory_allocated() - base})
            except Exception as e:
                out.append({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        return out
    if not _rss_peak_supported():
        return [{"error": "peak memory needs Linux /proc (VmHWM, clear_refs)"} for _ in todo]
    proc = subprocess.run(
        [sys.executable, "-m", "polyattn.experiments.bench_varlen", "--memory-worker"],
        input=json.dumps({"config": asdict(cfg), "cases": todo}),
        capture_output=True,
        text=True,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    while len(lines) < len(todo):
        lines.append({"error": f"memory worker exited with status {proc.returncode}"})
    return lines


def run_varlen_bench(cfg: VarlenBenchConfig, out_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Time (and measure) every row of :func:`cases`; returns the results also written to ``out_dir``."""
    from tqdm.auto import tqdm

    device = _device(cfg)
    old_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    todo = cases(cfg)
    bar = tqdm(total=len(todo), desc="varlen bench", disable=not progress, leave=False)
    try:
        for case in todo:
            row: dict[str, Any] = dict(case)
            try:
                fn, inputs, row["note"] = _make_case(case, cfg, device)
                _fwd_bwd(fn, *inputs, device)  # warm-up
                row["times_s"] = [_fwd_bwd(fn, *inputs, device) for _ in range(cfg.repeats)]
                row["time_s"] = min(row["times_s"])
            except Exception as e:  # e.g. torch's varlen_attn without a CUDA device
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            inputs = fn = None
            rows.append(row)
            bar.update(1)
        if cfg.memory:
            measured = [r for r in rows if "error" not in r]
            for r, m in zip(measured, _measure_memory(measured, cfg, device), strict=True):
                r.update({"peak_bytes": m["peak_bytes"]} if "peak_bytes" in m else {"memory_error": m["error"]})
        machine = machine_line(device.type)
    finally:
        bar.close()
        torch.set_num_threads(old_threads)
    packed = {r["activation"]: r for r in rows if r["layout"] == "packed" and r["method"] == "polyattn"}
    for r in rows:
        base = packed.get(r["activation"])
        if "time_s" in r and base is not None and "time_s" in base:
            r["vs_packed"] = r["time_s"] / base["time_s"]
    results = bench_results(cfg, machine, cfg.num_threads or old_threads, t_start, rows=rows)
    if out_dir is not None:
        write_bench_dir(out_dir, cfg, results, format_varlen_table(results))
    return results


def format_varlen_table(results: dict) -> str:
    cfg = results["config"]
    lengths = cfg["lengths"]
    lines = [
        f"polyattn bench --varlen on {results['machine']}",
        f"{len(lengths)} documents of {min(lengths)}..{max(lengths)} tokens ({sum(lengths)} in all), "
        f"{cfg['heads']} heads, d = {cfg['d']}, {cfg['dtype']}, causal={cfg['causal']}; forward + backward, "
        f"fastest of {cfg['repeats']}",
        "",
        f"{'activation':<13} {'layout':<11} {'method':<18} {'fwd+bwd':>10} {'vs packed':>10} {'peak mem':>11}  note",
    ]
    for r in results["rows"]:
        t = f"{r['time_s'] * 1e3:.0f} ms" if "time_s" in r else "-"
        vs = f"{r['vs_packed']:.2f}x" if "vs_packed" in r else "-"
        mem = f"{r['peak_bytes'] / 2**20:.0f} MiB" if "peak_bytes" in r else "-"
        note = r.get("error") or r.get("memory_error") or r.get("note", "")
        lines.append(f"{r['activation']:<13} {r['layout']:<11} {r['method']:<18} {t:>10} {vs:>10} {mem:>11}  {note}")
    lines.append(f"\nelapsed {results['elapsed_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--memory-worker"]:
        _memory_worker()
    else:
        print("usage: polyattn bench --varlen (this module's own entry point is the memory worker)", file=sys.stderr)
        sys.exit(2)
