"""What every ``polyattn bench`` kind shares: the device and dtype settings, a synchronised clock, timing in
turns, the peak resident set of a memory worker, and :func:`run_bench_kind`, the run skeleton (threads,
timing, machine line, results with the run record, config.yaml/results.json/report.txt, plots).

A kind supplies what it measures (a function returning the rows), its text table and, optionally, its plots;
every kind's results then hold the same keys in the same order (see :func:`bench_results`).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..utils import atomic_write_json, atomic_write_text
from ..utils.machine import machine_line
from ..utils.record import run_record
from ..utils.threads import torch_threads
from .report.common import power_base

__all__ = [
    "DTYPES",
    "SDPA",
    "bench_device",
    "bench_results",
    "bench_spec",
    "cuda_peak",
    "find_case",
    "fwd_bwd",
    "mmap_large_allocations",
    "proc_status",
    "rss_peak",
    "rss_peak_supported",
    "run_bench_kind",
    "run_memory_worker",
    "sync",
    "time_in_turns",
    "worker_job",
    "write_bench_dir",
]

# The dtypes a bench's ``dtype`` setting names (the grid bench also takes float64 and auto).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The grid bench's softmax baseline: F.scaled_dot_product_attention.
SDPA = "sdpa-softmax"


# --------------------------------------------------------------------------- #
# Device and clock
# --------------------------------------------------------------------------- #
def bench_device(setting: str) -> torch.device:
    """The device of a bench's ``device`` setting: auto is CUDA when torch sees one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(setting)


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def fwd_bwd(fn: Callable, q, k, v, do, device: torch.device | str, mode: str = "fwd+bwd") -> float:
    """Seconds of one forward, backward or both (``mode``) of ``fn(q, k, v)`` with upstream gradient ``do``."""
    q.grad = k.grad = v.grad = None
    sync(device)
    if mode == "bwd":
        out = fn(q, k, v)
        sync(device)
    t0 = time.perf_counter()
    if mode == "fwd":
        fn(q, k, v)
    elif mode == "bwd":
        out.backward(do)
    else:
        fn(q, k, v).backward(do)
    sync(device)
    return time.perf_counter() - t0


def time_in_turns(
    group: Sequence[tuple[dict, Callable[[], Any]]],
    rounds: int,
    device: torch.device | str,
    key: str = "step_times_s",
    tick: Callable[[], Any] | None = None,
) -> None:
    """Time ``rounds`` calls of each row's step in turns (one call of every row, then the next round), appending
    the seconds to ``row[key]``: on a shared machine a busy spell then hits every row, not whichever ran in it."""
    for _ in range(rounds):
        for row, step in group:
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            row[key].append(time.perf_counter() - t0)
            if tick is not None:
                tick()


# --------------------------------------------------------------------------- #
# Peak memory on CPU, in a worker process
# --------------------------------------------------------------------------- #
def proc_status() -> dict[str, int]:
    """This process's resident set now (VmRSS) and its high-water mark (VmHWM), in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def rss_peak_supported() -> bool:
    return sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")


def mmap_large_allocations() -> None:
    """glibc serves allocations of 64 KiB and more with mmap, so a freed tensor leaves the resident set at once."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD


def run_memory_worker(module: str, job: dict, progress: bool = False, quiet: bool = False) -> tuple[list[dict], int]:
    """Run ``python -m <module> --memory-worker`` on ``job`` (``{"config", "cases"}``, JSON on its stdin): the
    JSON lines it prints (one per case, in order) and its exit status. ``quiet``: drop what it writes to stderr."""
    from tqdm import tqdm

    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--memory-worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if quiet else None,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(job))
    proc.stdin.close()
    rows = []
    bar = tqdm(total=len(job["cases"]), desc="memory", disable=not progress, leave=False)
    for line in proc.stdout:
        if line.startswith("{"):
            rows.append(json.loads(line))
            bar.update(1)
    bar.close()
    return rows, proc.wait()


def worker_job(config_type: type) -> tuple[Any, list[dict]]:
    """A memory worker's start: large allocations to mmap, then its job from stdin (``{"config", "cases"}``),
    the config as ``config_type`` and its threads set (the worker process runs this one job)."""
    mmap_large_allocations()
    job = json.loads(sys.stdin.read())
    cfg = config_type(**job["config"])
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    return cfg, job["cases"]


def cuda_peak(fn: Callable, q, k, v, do) -> int:
    """Bytes CUDA memory allocated grows by at its highest during one ``fn(q, k, v).backward(do)``."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(q, k, v).backward(do)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def rss_peak(fn: Callable, q, k, v, do) -> int:
    """Bytes the resident set grows by at its highest during one ``fn(q, k, v).backward(do)``.

    The inputs and the upstream gradient exist before the high-water mark is reset, so the number counts
    the output, the gradients, everything saved for backward and every temporary.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = proc_status()["VmRSS"]
    fn(q, k, v).backward(do)
    return max(proc_status()["VmHWM"] - base, 0)


# --------------------------------------------------------------------------- #
# The grid bench's cases (shared with its report)
# --------------------------------------------------------------------------- #
def bench_spec(p: int, divisor: str) -> str:
    """The activation x^p/<divisor> of the grid bench ("none": no divisor)."""
    base = power_base(p)
    return base if divisor == "none" else f"{base}/{divisor}"


def find_case(cases: Iterable[dict], n, d, p, backend, causal: bool = False, mode: str = "fwd+bwd") -> dict | None:
    """The grid bench's case at (N, d, p, backend, causal, mode), or None."""
    for c in cases:
        same_point = c["n"] == n and c["d"] == d and c["p"] == p and c["backend"] == backend
        if same_point and c.get("causal", False) == causal and c.get("mode", "fwd+bwd") == mode:
            return c
    return None


# --------------------------------------------------------------------------- #
# Results, files, and the run skeleton
# --------------------------------------------------------------------------- #
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


def run_bench_kind(
    cfg: Any,
    device: torch.device | str,
    measure: Callable[[], dict[str, Any]],
    table: Callable[[dict], str],
    out_dir: str | os.PathLike | None = None,
    plot: Callable[[dict, Path], Sequence[os.PathLike]] | None = None,
) -> dict:
    """Run one bench: ``measure()`` under the config's ``num_threads`` (restored after), then the results
    (:func:`bench_results`, with what ``measure`` returned), and with ``out_dir`` its files: config.yaml,
    results.json, report.txt (``table(results)``) and, with ``plot``, the figures it draws (``results["plots"]``).
    """
    with torch_threads(cfg.num_threads) as threads:
        t_start = time.perf_counter()
        measured = measure()
        machine = machine_line(torch.device(device).type)
    results = bench_results(cfg, machine, threads, t_start, **measured)
    if out_dir is not None:
        out = write_bench_dir(out_dir, cfg, results, table(results))
        if plot is not None:
            results["plots"] = [str(p) for p in plot(results, out)]
    return results
