"""``polyattn kernels``: compile every Triton kernel configuration for GPU targets (no GPU needed)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import fail, str_list


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=str_list, default=["sm_80", "sm_90"], help="GPU targets (default sm_80,sm_90)")
    p.add_argument("--out", default="runs/kernels", help="folder for kernels.json, kernels.txt (default %(default)s)")
    p.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: one per CPU core)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="each pass, dtype and launch configuration once, at the largest head dimension that uses it, with "
        "the costliest activation (what CI compiles); the default compiles every head dim, activation and causal",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    from ..core.backends.kernel_check import (
        check_kernels,
        format_kernel_table,
        parse_target,
        problems,
        triton_missing_reason,
    )
    from ..utils import atomic_write_json, atomic_write_text, prepare_out_dir

    reason = triton_missing_reason()
    if reason is not None:
        print(f"error: cannot compile the kernels: {reason}", file=sys.stderr)
        return 2
    try:
        targets = [parse_target(t) for t in args.target]
    except ValueError as e:
        return fail(e)
    if not targets:
        print("error: --target names no GPU target: give one or more, e.g. --target sm_80,sm_90", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    # Minutes of compiling go nowhere if the folder cannot take the results: check it first.
    out = prepare_out_dir(args.out, "kernels")

    def progress(done: int, total: int) -> None:
        if not args.no_progress:
            print(f"\rcompiled {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    rows = check_kernels(targets, quick=args.quick, jobs=args.jobs, progress=progress)
    elapsed = time.perf_counter() - t0
    bad = problems(rows)
    table = format_kernel_table(rows)
    summary = {"targets": [f"sm_{t}" for t in targets], "quick": args.quick, "elapsed_s": elapsed}
    atomic_write_json({**summary, "problems": bad, "rows": rows}, out / "kernels.json")
    atomic_write_text(table + "\n", out / "kernels.txt")
    print(table)
    print(f"\n{len(rows)} compiles in {elapsed:.0f} s ({args.jobs} processes); wrote {out / 'kernels.json'}, .txt")
    if bad:
        print(f"\n{len(bad)} configuration(s) fail:", file=sys.stderr)
        for line in bad:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0
