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

import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
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
from ..utils import atomic_write_json, atomic_write_text
from ..utils.machine import machine_line
from ..utils.record import run_record

__all__ = [
    "BenchConfig",
    "QUICK",
    "format_table",
    "run_bench",
]

SDPA = "sdpa-softmax"
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
        base = "x" if p == 1 else f"x^{p}"
        return base if self.divisor == "none" else f"{base}/{self.divisor}"


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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(fn, q, k, v, do, device: str, mode: str = "fwd+bwd") -> float:
    """Seconds of one forward, backward or both (``mode``)."""
    q.grad = k.grad = v.grad = None
    _sync(device)
    if mode == "bwd":
        out = fn(q, k, v)
        _sync(device)
    t0 = time.perf_counter()
    if mode == "fwd":
        fn(q, k, v)
    elif mode == "bwd":
        out.backward(do)
    else:
        fn(q, k, v).backward(do)
    _sync(device)
    return time.perf_counter() - t0


def time_case(fn, inputs, device: str, repeats: int, warmup: bool) -> list[float]:
    """Seconds of each timed fwd+bwd run."""
    if warmup:
        _fwd_bwd(fn, *inputs, device)
    return [_fwd_bwd(fn, *inputs, device) for _ in range(repeats)]


# --------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------
def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _rss_peak_supported() -> bool:
    return sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")


def _memory_worker() -> None:
    """Reads one JSON list of cases from stdin, prints one JSON line per case: peak extra bytes."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: allocations >= 64 KiB are mmapped, freed at once
    job = json.loads(sys.stdin.read())
    cfg = BenchConfig(**job["config"])
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    warmed: set[tuple] = set()
    for case in job["cases"]:
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
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            base = _proc_status()["VmRSS"]
            out = fn(q, k, v)
            out.backward(do)
            peak = _proc_status()["VmHWM"] - base
            row = {"key": case["key"], "peak_bytes": max(peak, 0)}
        except Exception as e:  # report, keep measuring the rest
            row = {"key": case["key"], "error": f"{type(e).__name__}: {e}"}
        # Free this case's tensors (and gradients) before the next baseline is read.
        out = None
        del q, k, v, do, out
        print(json.dumps(row), flush=True)


def measure_memory(cases: list[dict], cfg: BenchConfig, progress: bool = True) -> dict[str, dict]:
    """Peak extra memory of each case: {key: {"peak_bytes": int} or {"error": str}}."""
    if not cases:
        return {}
    if cfg.device == "cuda":
        out = {}
        for case in cases:
            inputs = _inputs(case["n"], case["d"], cfg, cfg.seed)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            q, k, v, do = inputs
            _case_fn(case["backend"], case["spec"], case.get("causal", False), cfg.sdpa_backend)(q, k, v).backward(do)
            torch.cuda.synchronize()
            out[case["key"]] = {"peak_bytes": torch.cuda.max_memory_allocated() - base}
            del inputs, q, k, v, do
        return out
    if not _rss_peak_supported():
        return {c["key"]: {"error": "peak memory needs Linux /proc (VmHWM, clear_refs)"} for c in cases}
    job = json.dumps({"config": asdict(cfg), "cases": cases})
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyattn.experiments.bench", "--memory-worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(job)
    proc.stdin.close()
    results: dict[str, dict] = {}
    bar = _progress(len(cases), "memory", progress)
    for line in proc.stdout:
        row = json.loads(line)
        results[row.pop("key")] = row
        bar.update(1)
    bar.close()
    if proc.wait() != 0:
        for c in cases:
            results.setdefault(c["key"], {"error": f"memory worker exited with status {proc.returncode}"})
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
    old_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t_start = time.perf_counter()
    try:
        cases = _plan_cases(cfg)
        timed = [c for c in cases if c["skipped"] is None and c["backend"] != "auto"]
        # auto reuses the row of the backend it picks; time that backend if it is not in the list.
        for c in cases:
            if c["backend"] == "auto" and c["skipped"] is None:
                twin = _find(cases, c["n"], c["d"], c["p"], c["picked"], c["causal"], c["mode"])
                if twin is None or twin["skipped"] is not None:
                    timed.append(c)
        _time_interleaved(timed, cfg, progress)
        for c in cases:
            if c["backend"] == "auto" and c["skipped"] is None and "times_s" not in c:
                twin = _find(cases, c["n"], c["d"], c["p"], c["picked"], c["causal"], c["mode"])
                c["times_s"] = twin.get("times_s") if twin else None
            if c.get("times_s"):
                c["time_s"] = min(c["times_s"])
                c["time_median_s"] = statistics.median(c["times_s"])
        if cfg.memory:
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
                    src = _find(cases, c["n"], c["d"], c["p"], c.get("picked"), c["causal"], c["mode"]) or c
                if src["key"] in mem:
                    c.update({f"memory_{k}" if k == "error" else k: v for k, v in mem[src["key"]].items()})
        _add_ratios(cases)
        machine = machine_line(cfg.device)
    finally:
        torch.set_num_threads(old_threads)
    results = bench_results(cfg, machine, cfg.num_threads or old_threads, t_start, cases=cases)
    if out_dir is not None:
        out = write_bench_dir(out_dir, cfg, results, format_table(results))
        if plots:
            results["plots"] = [str(p) for p in plot_bench(results, out)]
    return results


def bench_results(cfg: Any, machine: str, threads: int, t_start: float, **measured: Any) -> dict:
    """The results dict every bench writes: its config, the machine, threads, elapsed time, the run record,
    then the rows. ``threads``: the torch threads the measurements ran with (the bench's own setting)."""
    return {
        "config": asdict(cfg),
        "machine": machine,
        "threads": threads,
        "elapsed_s": time.perf_counter() - t_start,
        # Each row names its backend; the record's backends stay None.
        "record": run_record(
            device=getattr(cfg, "device", None),
            precision=getattr(cfg, "dtype", None) or getattr(cfg, "amp", None),
            threads=threads,
        ),
        **measured,
    }


def write_bench_dir(out_dir: str | os.PathLike, cfg: Any, results: dict, report: str) -> Path:
    """``config.yaml``, ``results.json`` and ``report.txt`` of a bench in ``out_dir``; returns the folder."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(yaml.safe_dump(asdict(cfg), sort_keys=False), out / "config.yaml")
    atomic_write_json(results, out / "results.json")
    atomic_write_text(report + "\n", out / "report.txt")
    return out


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
                    _fwd_bwd(fn, *inputs, cfg.device, c["mode"])
                except Exception as e:
                    c["error"] = f"{type(e).__name__}: {e}"
        for r in range(max(runs for _, _, runs in plan)):
            for c, fn, runs in plan:
                if r >= runs or c.get("error"):
                    continue
                bar.set_postfix_str(c["key"])
                try:
                    c["times_s"].append(_fwd_bwd(fn, *inputs, cfg.device, c["mode"]))
                except Exception as e:
                    c["error"] = f"{type(e).__name__}: {e}"
        bar.update(len(group))
        del inputs
    bar.close()


def _find(cases, n, d, p, backend, causal: bool = False, mode: str = "fwd+bwd"):
    for c in cases:
        same_point = c["n"] == n and c["d"] == d and c["p"] == p and c["backend"] == backend
        if same_point and c.get("causal", False) == causal and c.get("mode", "fwd+bwd") == mode:
            return c
    return None


def _add_ratios(cases: list[dict]) -> None:
    for c in cases:
        base = _find(cases, c["n"], c["d"], None, SDPA, c.get("causal", False), c.get("mode", "fwd+bwd"))
        if base is None:
            continue
        if c.get("time_s") and base.get("time_s"):
            c["time_vs_sdpa"] = c["time_s"] / base["time_s"]
        if c.get("peak_bytes") is not None and base.get("peak_bytes"):
            c["memory_vs_sdpa"] = c["peak_bytes"] / base["peak_bytes"]


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------
def _ms(t: float | None) -> str:
    return "-" if t is None else (f"{t * 1e3:.1f}" if t < 10 else f"{t * 1e3:.0f}")


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def _section(cfg: dict, cases: list[dict], backends: list[str], d: int, p: int, causal: bool, mode: str) -> list:
    spec = BenchConfig(**cfg).activation(p)
    what = ("causal " if causal else "") + (mode if mode != "fwd+bwd" or len(cfg.get("modes", [])) > 1 else "")
    lines = ["", f"== d={d}  {spec}  {what + '  ' if what else ''}vs SDPA softmax =="]
    head = f"{'N':>6} {'sdpa ms':>9} {'MiB':>6} |"
    for b in backends:
        head += f" {b + ' ms (x, mem x)':>26} |"
    lines.append(head)
    for n in cfg["ns"]:
        base = _find(cases, n, d, None, SDPA, causal, mode) or {}
        row = f"{n:>6} {_ms(base.get('time_s')):>9} {_mib(base.get('peak_bytes')):>6} |"
        for b in backends:
            c = _find(cases, n, d, p, b, causal, mode) or {}
            if c.get("skipped"):
                cell = "skipped"
            elif c.get("error"):
                cell = "error"
            elif c.get("time_s") is None:
                cell = "-"
            else:
                tr = c.get("time_vs_sdpa")
                mr = c.get("memory_vs_sdpa")
                ratios = f"{'-' if tr is None else f'{tr:.2f}'}, {'-' if mr is None else f'{mr:.2f}'}"
                cell = f"{_ms(c['time_s'])} ({ratios})"
                if b == "auto":
                    cell = f"{c['picked'][:4]}: " + cell
            row += f" {cell:>26} |"
        lines.append(row)
    return lines


def format_table(results: dict) -> str:
    """Per (d, p): rows N; SDPA ms and MiB, then each backend's ms, time ratio and memory ratio vs SDPA."""
    cfg = results["config"]
    cases = results["cases"]
    lines = [
        f"polyattn bench on {results['machine']}",
        f"B={cfg['batch']} H={cfg['heads']} {cfg['dtype']} {cfg['device']}; "
        f"{', '.join(cfg.get('modes', ['fwd+bwd']))}, fastest of the timed runs; ratios < 1 beat SDPA"
        + (f"; SDPA kernel: {cfg['sdpa_backend']}" if cfg.get("sdpa_backend", "auto") != "auto" else ""),
    ]
    backends = cfg["backends"]
    for d in cfg["ds"]:
        for causal in cfg.get("causal", [False]):
            for mode in cfg.get("modes", ["fwd+bwd"]):
                for p in cfg["ps"]:
                    lines += _section(cfg, cases, backends, d, p, causal, mode)
    skips = sorted({(c["backend"], c["skipped"]) for c in cases if c.get("skipped")})
    errors = [(c["key"], c["error"]) for c in cases if c.get("error")]
    if skips:
        lines.append("")
        lines.append("skipped (backend: reason, one example each):")
        seen = set()
        for b, why in skips:
            short = why.split(" vs ")[0] if why.startswith("cost model estimates") else why
            if (b, short[:40]) in seen:
                continue
            seen.add((b, short[:40]))
            lines.append(f"  {b}: {why}")
    for key, err in errors:
        lines.append(f"error {key}: {err}")
    lines.append(f"\nelapsed {results['elapsed_s']:.0f} s")
    return "\n".join(lines)


# Fixed styles so a backend keeps its colour when another has no points; auto
# is drawn wide and pale underneath the backend it picked.
_STYLE = {
    SDPA: {"color": "black", "linestyle": "--", "marker": "o", "ms": 3},
    "auto": {"color": "tab:purple", "linewidth": 5, "alpha": 0.3},
    "chunked": {"color": "tab:orange", "marker": "o", "ms": 3},
    "linear": {"color": "tab:green", "marker": "o", "ms": 3},
    "reference": {"color": "tab:red", "marker": "o", "ms": 3},
    "triton": {"color": "tab:blue", "marker": "o", "ms": 3},
    "sdpa": {"color": "tab:gray", "marker": "o", "ms": 3},
}


def plot_bench(results: dict, out_dir: Path) -> list[Path]:
    """bench_time.png and bench_memory.png: one panel per (d, p), one line per backend, log-log."""
    from .plots import pyplot, save_figure

    plt = pyplot()
    cfg = results["config"]
    cases = results["cases"]
    # One panel per (d, p): the first causal setting, fwd+bwd when it was timed.
    causal = cfg.get("causal", [False])[0]
    modes = cfg.get("modes", ["fwd+bwd"])
    mode = "fwd+bwd" if "fwd+bwd" in modes else modes[0]
    paths = []
    for metric, ylabel, fname in (
        ("time_s", f"{mode} time (s)", "bench_time.png"),
        ("peak_bytes", "peak extra memory (MiB)", "bench_memory.png"),
    ):
        if metric == "peak_bytes" and not any(c.get("peak_bytes") for c in cases):
            continue
        nd, np_ = len(cfg["ds"]), len(cfg["ps"])
        fig, axes = plt.subplots(nd, np_, figsize=(4.2 * np_, 3.4 * nd), squeeze=False)
        for i, d in enumerate(cfg["ds"]):
            for j, p in enumerate(cfg["ps"]):
                ax = axes[i][j]
                for b in [SDPA, *cfg["backends"]]:
                    pts = []
                    for n in cfg["ns"]:
                        c = _find(cases, n, d, None if b == SDPA else p, b, causal, mode)
                        if c and c.get(metric):
                            pts.append((n, c[metric] / (2**20 if metric == "peak_bytes" else 1)))
                    if pts:
                        xs, ys = zip(*pts, strict=True)
                        ax.plot(xs, ys, label="SDPA softmax" if b == SDPA else b, **_STYLE.get(b, {}))
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"d={d}, {BenchConfig(**cfg).activation(p)}", fontsize=9)
                ax.set_xlabel("N")
                ax.set_ylabel(ylabel, fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(f"polyattn bench: {results['machine']}", fontsize=9)
        fig.tight_layout()
        paths.append(save_figure(fig, out_dir / fname, dpi=110))
    return paths


if __name__ == "__main__":
    if sys.argv[1:] == ["--memory-worker"]:
        _memory_worker()
    else:
        print("usage: polyattn bench (this module's own entry point is the memory worker)", file=sys.stderr)
        sys.exit(2)
