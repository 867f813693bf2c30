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

import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..core.activations import get_activation
from ..core.functional import attention
from ..core.varlen import attention_varlen, select_backend_varlen
from ..training.config import int_setting, ints_at_least, setting, settings_from_dict, specs_setting
from . import bench_common as common
from .report.bench import format_varlen_table

__all__ = ["VarlenBenchConfig", "run_varlen_bench"]

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
    dtype: str = setting("float32", choices=tuple(common.DTYPES))
    num_threads: int | None = int_setting(None, 0, nullable=True)
    memory: bool = True
    seed: int = 0

    @staticmethod
    def from_dict(data: dict[str, Any]) -> VarlenBenchConfig:
        cfg = settings_from_dict(VarlenBenchConfig, data, "varlen bench config")
        for spec in cfg.activations:
            get_activation(spec)  # a clear error for a malformed spec
        return cfg


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
    dtype = common.DTYPES[cfg.dtype]
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


def _memory_worker() -> None:
    """Reads {config, cases} as JSON from stdin; prints one JSON line of peak extra bytes per case."""
    cfg, cases = common.worker_job(VarlenBenchConfig)
    device = torch.device("cpu")
    small = replace(cfg, lengths=[16, 8])
    for case in cases:
        try:
            fn, inputs, _ = _make_case(case, small, device)  # first calls allocate pools: unmeasured
            fn(*inputs[:3]).backward(inputs[3])
            fn, inputs, _ = _make_case(case, cfg, device)
            row = {"peak_bytes": common.rss_peak(fn, *inputs)}
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
                out.append({"peak_bytes": common.cuda_peak(fn, *inputs)})
            except Exception as e:
                out.append({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        return out
    if not common.rss_peak_supported():
        return [{"error": "peak memory needs Linux /proc (VmHWM, clear_refs)"} for _ in todo]
    job = {"config": asdict(cfg), "cases": todo}
    lines, status = common.run_memory_worker("polyattn.experiments.bench_varlen", job, quiet=True)
    while len(lines) < len(todo):
        lines.append({"error": f"memory worker exited with status {status}"})
    return lines


def run_varlen_bench(cfg: VarlenBenchConfig, out_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Time (and measure) every row of :func:`cases`; returns the results also written to ``out_dir``."""
    device = common.bench_device(cfg.device)
    return common.run_bench_kind(cfg, device, partial(_measure, cfg, device, progress), format_varlen_table, out_dir)


def _measure(cfg: VarlenBenchConfig, device: torch.device, progress: bool) -> dict[str, list[dict]]:
    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    todo = cases(cfg)
    bar = tqdm(total=len(todo), desc="varlen bench", disable=not progress, leave=False)
    try:
        for case in todo:
            row: dict[str, Any] = dict(case)
            try:
                fn, inputs, row["note"] = _make_case(case, cfg, device)
                common.fwd_bwd(fn, *inputs, device)  # warm-up
                row["times_s"] = [common.fwd_bwd(fn, *inputs, device) for _ in range(cfg.repeats)]
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
    finally:
        bar.close()
    packed = {r["activation"]: r for r in rows if r["layout"] == "packed" and r["method"] == "polyattn"}
    for r in rows:
        base = packed.get(r["activation"])
        if "time_s" in r and base is not None and "time_s" in base:
            r["vs_packed"] = r["time_s"] / base["time_s"]
    return {"rows": rows}


if __name__ == "__main__":
    if sys.argv[1:] == ["--memory-worker"]:
        _memory_worker()
    else:
        print("usage: polyattn bench --varlen (this module's own entry point is the memory worker)", file=sys.stderr)
        sys.exit(2)
