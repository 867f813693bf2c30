"""``polyattn bench``: forward+backward time and peak memory of SDPA softmax and every polyattn backend.

One run times, side by side, ``F.scaled_dot_product_attention`` (softmax) and
``polyattn.attention(q, k, v, "x^p/sqrt(N)", backend=b)`` for each backend b
over a grid of N, d and p, and reports ratios against SDPA.

Timing: each case runs fwd+bwd (``out.backward(g)``) ``repeats`` times after
one warm-up run (no warm-up for cases the cost model puts above 1 s); the
table uses the fastest run (on a shared machine the fastest run is the one
least disturbed by other processes) and the JSON keeps every run.

Peak memory, CPU: the bytes the process's resident set grows by during one
fwd+bwd, measured in a separate worker process in which glibc is told to
serve every allocation above 64 KiB with mmap (so a freed tensor leaves the
resident set at once) and the kernel's high-water mark (VmHWM) is reset
before each case through /proc/self/clear_refs. The inputs and the upstream
gradient exist before the reset, so the number counts the output, the
gradients, everything saved for backward and every temporary, including
memory allocated inside C++ kernels (SDPA's), which Python-level tracing
cannot see. Linux only; elsewhere memory is reported as unavailable.
GPU: ``torch.cuda.max_memory_allocated`` above the same baseline.

``auto`` is reported as the backend it picks (the same code path runs), so
its time is that backend's row.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..core.activations import get_activation
from ..core.backends import BACKENDS, call_info, choose_backend
from ..core.backends.auto import estimate
from ..core.functional import attention
from ..training.config import (
    check_settings,
    int_setting,
    ints_at_least,
    list_of,
    setting,
    settings_from_dict,
    subset_of,
)
from .bench_common import (
    SDPA,
    bench_results,
    bench_spec,
    cuda_peak,
    find_case,
    fwd_bwd,
    rss_peak,
    rss_peak_supported,
    run_bench_kind,
    run_memory_worker,
    worker_job,
)
from .report.bench import format_grid_table, plot_bench

__all__ = [
    "BenchConfig",
    "QUICK",
    "bench_results",
    "run_bench",
]

MODES = ("fwd", "bwd", "fwd+bwd")
_SDPA_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")


def _is_divisor(text: str) -> bool:
    if text in ("sqrt(N)", "N", "none"):
        return True
    try:
        return float(text) > 0
    except ValueError:
        return False


@dataclass
class BenchConfig:
    """The grid and the measurement settings of one ``polyattn bench`` run."""

    ns: list[int] = setting([256, 512, 1024, 2048, 4096, 8192, 16384], **ints_at_least(1))
    ds: list[int] = setting([32, 64], **ints_at_least(1))
    ps: list[int] = setting([1, 2, 3], **ints_at_least(1))
    heads: int = int_setting(4)
    batch: int = int_setting(1)
    # the activation is x^p/<divisor>
    divisor: str = setting("sqrt(N)", check=_is_divisor, requirement="'sqrt(N)', 'N', 'none' or a positive number")
    backends: list[str] = setting(
        ["auto", "chunked", "linear", "reference"], **subset_of(("auto", *sorted(BACKENDS)), empty=True)
    )
    repeats: int = int_setting(3)
    # "auto": cuda when available, else cpu
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))
    # "auto": float32 on CPU, bfloat16 on GPU
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16", "float64"))
    memory: bool = True
    # torch threads on CPU (default: torch's own, all cores)
    num_threads: int | None = int_setting(None, 0, nullable=True)
    seed: int = 0
    # A backend is skipped (and the skip reported) when the cost model puts it
    # above skip_factor x the fastest supported backend and above min_skip_s,
    # or above max_case_s: the linear form with 45,760 features, say.
    skip_factor: float = 5.0
    min_skip_s: float = 1.0
    max_case_s: float = 60.0
    # Seconds of timed runs per case at most (slow cases run fewer repeats).
    case_budget_s: float = 12.0
    # each case with and/or without causal masking
    causal: list[bool] = setting([False], **list_of(lambda c: isinstance(c, bool), "true/false"))
    # What is timed: "fwd" (the forward of a training step: inputs require grad), "bwd" (backward
    # alone, after an untimed forward) and "fwd+bwd"; memory is measured for fwd+bwd only.
    modes: list[str] = setting(["fwd+bwd"], **subset_of(MODES))
    # The SDPA softmax baseline's kernel: "auto" (PyTorch picks) or one of flash, efficient, cudnn, math.
    sdpa_backend: str = setting("auto", choices=_SDPA_KERNELS)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> BenchConfig:
        return settings_from_dict(BenchConfig, data, "bench config")

    def validate(self) -> None:
        check_settings(self, "bench config")

    def resolved(self) -> BenchConfig:
        cfg = BenchConfig(**asdict(self))
        if cfg.device == "auto":
            cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg.dtype == "auto":
            cfg.dtype = "bfloat16" if cfg.device == "cuda" else "float32"
        if cfg.device == "cuda" and "triton" not in cfg.backends:
            cfg.backends = [*cfg.backends, "triton"]
        return cfg

    def activation(self, p: int) -> str:
        return bench_spec(p, self.divisor)


# The --quick grid: the headline shape (d = 64, x^3) at three lengths.
QUICK: dict[str, Any] = {"ns": [256, 1024, 4096], "ds": [64], "ps": [3], "repeats": 2}


# --------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------
def _inputs(n: int, d: int, cfg: BenchConfig, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, cfg.dtype)
    shape = (cfg.batch, cfg.heads, n, d)
    # Unit-variance q, k: scores q.k/sqrt(d) of order 1, as in a trained model.
    q, k, v, do = (torch.randn(*shape, generator=g).to(device=cfg.device, dtype=dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def _case_fn(backend: str, spec: str, causal: bool = False, sdpa_backend: str = "auto"):
    if backend == SDPA:
        if sdpa_backend == "auto":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }[sdpa_backend]

        def sdpa(q, k, v):
            with sdpa_kernel(kernel):  # the backward runs the same kernel's backward
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa
    return lambda q, k, v: attention(q, k, v, spec, backend=backend, causal=causal)


def time_case(fn, inputs, device: str, repeats: int, warmup: bool) -> list[float]:
    """Seconds of each timed fwd+bwd run."""
    if warmup:
        fwd_bwd(fn, *inputs, device)
    return [fwd_bwd(fn, *inputs, device) for _ in range(repeats)]


# --------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------
def _memory_worker() -> None:
    """Reads one JSON list of cases from stdin, prints one JSON line per case: peak extra bytes."""
    cfg, cases = worker_job(BenchConfig)
    warmed: set[tuple] = set()
    for case in cases:
        fn = _case_fn(case["backend"], case["spec"], case.get("causal", False), cfg.sdpa_backend)
        # Thread pools, BLAS buffers and lazy imports are allocated on a code
        # path's first call: take that first call on a small problem, unmeasured.
        first = (case["backend"], case["spec"], case["d"])
        if first not in warmed:
            warmed.add(first)
            q, k, v, do = _inputs(min(case["n"], 256), case["d"], cfg, cfg.seed)
            fn(q, k, v).backward(do)
            del q, k, v, do
        q, k, v, do = _inputs(case["n"], case["d"], cfg, cfg.seed)
        try:
            row = {"key": case["key"], "peak_bytes": rss_peak(fn, q, k, v, do)}
        except Exception as e:  # report, keep measuring the rest
            row = {"key": case["key"], "error": f"{type(e).__name__}: {e}"}
        # Free this case's tensors (and gradients) before the next baseline is read.
        del q, k, v, do
        print(json.dumps(row), flush=True)


def measure_memory(cases: list[dict], cfg: BenchConfig, progress: bool = True) -> dict[str, dict]:
    """Peak extra memory of each case: {key: {"peak_bytes": int} or {"error": str}}."""
    if not cases:
        return {}
    if cfg.device == "cuda":
        out = {}
        for case in cases:
            fn = _case_fn(case["backend"], case["spec"], case.get("causal", False), cfg.sdpa_backend)
            out[case["key"]] = {"peak_bytes": cuda_peak(fn, *_inputs(case["n"], case["d"], cfg, cfg.seed))}
        return out
    if not rss_peak_supported():
        return {c["key"]: {"error": "peak memory needs Linux /proc (VmHWM, clear_refs)"} for c in cases}
    rows, status = run_memory_worker("polyattn.experiments.bench", {"config": asdict(cfg), "cases": cases}, progress)
    results = {row.pop("key"): row for row in rows}
    if status != 0:
        for c in cases:
            results.setdefault(c["key"], {"error": f"memory worker exited with status {status}"})
    return results


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


# --------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------
def _plan_cases(cfg: BenchConfig) -> list[dict]:
    """Every (N, d, causal, mode, p, backend) case with its cost-model estimate, or the reason it is skipped."""
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    cases = []
    for d in cfg.ds:
        for n in cfg.ns:
            for causal in cfg.causal:
                for mode in cfg.modes:
                    cases += _plan_point(cfg, n, d, causal, mode, device, dtype)
    return cases


def _plan_point(cfg: BenchConfig, n: int, d: int, causal: bool, mode: str, device, dtype) -> list[dict]:
    meta = torch.empty(cfg.batch, cfg.heads, n, d, device="meta", dtype=dtype)
    base = replace(call_info(meta, meta, "softmax", v=meta), device=device, causal=causal)
    where = {"causal": causal, "mode": mode}
    cases = [_case(n, d, None, SDPA, "softmax", estimate("sdpa", base).seconds, None, **where)]
    for p in cfg.ps:
        spec = cfg.activation(p)
        info = replace(base, activation=get_activation(spec))
        choice = choose_backend(info)
        estimates = {}
        for b, backend in BACKENDS.items():
            why_not = backend.unsupported(info)
            estimates[b] = (None, why_not) if why_not else (estimate(b, info).seconds, None)
        finite = [t for t, _ in estimates.values() if t is not None and math.isfinite(t)]
        best = min(finite) if finite else math.inf
        for b in cfg.backends:
            name = choice.name if b == "auto" else b
            est, skip = estimates[name]
            if skip is None and not math.isfinite(est):
                skip = f"cost model: {estimate(name, info).note}"
            elif skip is None and (est > max(cfg.skip_factor * best, cfg.min_skip_s) or est > cfg.max_case_s):
                skip = f"cost model estimates {est:.3g} s vs {best:.3g} s for the fastest backend"
            row = _case(n, d, p, b, spec, est, skip, **where)
            if b == "auto":
                row["picked"] = name
                row["reason"] = choice.reason
            cases.append(row)
    return cases


def _case(n, d, p, backend, spec, est, skip, causal: bool = False, mode: str = "fwd+bwd") -> dict:
    key = f"n={n},d={d},p={p},backend={backend}"
    key += ",causal" if causal else ""
    key += f",mode={mode}" if mode != "fwd+bwd" else ""
    return {
        "key": key,
        "n": n,
        "d": d,
        "p": p,
        "backend": backend,
        "spec": spec,
        "causal": causal,
        "mode": mode,
        "estimate_s": est,
        "skipped": skip,
    }


def run_bench(
    cfg: BenchConfig, out_dir: str | os.PathLike | None = None, progress: bool = True, plots: bool = True
) -> dict:
    """Run the grid; returns (and writes to out_dir) the results."""

    cfg = cfg.resolved()
    cfg.validate()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    measure = partial(_measure, cfg, progress)
    return run_bench_kind(cfg, cfg.device, measure, format_grid_table, out_dir, plot=plot_bench if plots else None)


def _measure(cfg: BenchConfig, progress: bool) -> dict[str, list[dict]]:
    """Every case of the grid, timed (and its memory measured) unless skipped, with its ratios to SDPA."""
    cases = _plan_cases(cfg)
    timed = [c for c in cases if c["skipped"] is None and c["backend"] != "auto"]
    # auto reuses the row of the backend it picks; time that backend if it is not in the list.
    for c in cases:
        if c["backend"] == "auto" and c["skipped"] is None:
            twin = find_case(cases, c["n"], c["d"], c["p"], c["picked"], c["causal"], c["mode"])
            if twin is None or twin["skipped"] is not None:
                timed.append(c)
    _time_interleaved(timed, cfg, progress)
    for c in cases:
        if c["backend"] == "auto" and c["skipped"] is None and "times_s" not in c:
            twin = find_case(cases, c["n"], c["d"], c["p"], c["picked"], c["causal"], c["mode"])
            c["times_s"] = twin.get("times_s") if twin else None
        if c.get("times_s"):
            c["time_s"] = min(c["times_s"])
            c["time_median_s"] = statistics.median(c["times_s"])
    if cfg.memory:
        _add_memory(cases, timed, cfg, progress)
    _add_ratios(cases)
    return {"cases": cases}


def _add_memory(cases: list[dict], timed: list[dict], cfg: BenchConfig, progress: bool) -> None:
    """Peak memory of every timed fwd+bwd case; an auto row takes that of the backend it picks."""
    measured = [c for c in cases if c.get("time_s") is not None and c["backend"] != "auto"]
    measured += [c for c in cases if c["backend"] == "auto" and c in timed]
    mem_cases = [
        {k: c[k] for k in ("key", "n", "d", "spec", "causal")} | {"backend": c.get("picked", c["backend"])}
        for c in measured
        if c["mode"] == "fwd+bwd"
    ]
    mem = measure_memory(mem_cases, cfg, progress)
    for c in cases:
        src = c
        if c["backend"] == "auto" and c["key"] not in mem:
            src = find_case(cases, c["n"], c["d"], c["p"], c.get("picked"), c["causal"], c["mode"]) or c
        if src["key"] in mem:
            c.update({f"memory_{k}" if k == "error" else k: v for k, v in mem[src["key"]].items()})


def _time_interleaved(timed: list[dict], cfg: BenchConfig, progress: bool) -> None:
    """Time every case of one (N, d) in turns: run r of each case, then run r + 1 of each.

    On a shared machine the load drifts; taking turns spreads the drift over
    all backends instead of penalising whichever ran during a busy spell.
    """
    groups: dict[tuple[int, int], list[dict]] = {}
    for c in timed:
        groups.setdefault((c["n"], c["d"]), []).append(c)
    bar = _progress(len(timed), "timing", progress)
    for (n, d), group in groups.items():
        inputs = _inputs(n, d, cfg, cfg.seed)
        plan = []
        for c in group:
            name = c["picked"] if c["backend"] == "auto" else c["backend"]
            est = c["estimate_s"] or 0.0
            runs = max(1, min(cfg.repeats, int(cfg.case_budget_s / max(est, 1e-9))))
            fn = _case_fn(name, c["spec"], c["causal"], cfg.sdpa_backend)
            c["times_s"] = []
            plan.append((c, fn, runs))
            if est < 1.0:  # warm-up: first-call allocations and lazy initialisation
                try:
                    fwd_bwd(fn, *inputs, cfg.device, c["mode"])
                except Exception as e:
                    c["error"] = f"{type(e).__name__}: {e}"
        for r in range(max(runs for _, _, runs in plan)):
            for c, fn, runs in plan:
                if r >= runs or c.get("error"):
                    continue
                bar.set_postfix_str(c["key"])
                try:
                    c["times_s"].append(fwd_bwd(fn, *inputs, cfg.device, c["mode"]))
                except Exception as e:
                    c["error"] = f"{type(e).__name__}: {e}"
        bar.update(len(group))
        del inputs
    bar.close()


def _add_ratios(cases: list[dict]) -> None:
    for c in cases:
        base = find_case(cases, c["n"], c["d"], None, SDPA, c.get("causal", False), c.get("mode", "fwd+bwd"))
        if base is None:
            continue
        if c.get("time_s") and base.get("time_s"):
            c["time_vs_sdpa"] = c["time_s"] / base["time_s"]
        if c.get("peak_bytes") is not None and base.get("peak_bytes"):
            c["memory_vs_sdpa"] = c["peak_bytes"] / base["peak_bytes"]


if __name__ == "__main__":
    if sys.argv[1:] == ["--memory-worker"]:
        _memory_worker()
    else:
        print("usage: polyattn bench (this module's own entry point is the memory worker)", file=sys.stderr)
        sys.exit(2)
