"""``polyattn train --config FILE.yaml [--point NAME] [--set key=value ...] [--out RUN_DIR] [--resume RUN_DIR]``.

A grid config (configs/table2.yaml, ...) holds many runs: ``--list-points`` names them,
``--point NAME`` trains one, ``--all-points --out DIR`` trains each into ``DIR/runs/<point>``
(``--resume`` then reuses finished ones and continues the others).

Under ``torchrun --nproc_per_node=N -m polyattn train ...`` every process runs
this command and trains one DDP replica; rank 0 writes the run directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import add_point_arguments, add_set_argument, fail, print_points, run_training


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="config file (default: vit_micro on digits)")
    add_set_argument(p, "train.epochs=5 model.activation='x^3/sqrt(N)'")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/<model>_<data>_<activation>_<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars or per-epoch lines (the summary is still printed)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_point_arguments(p)
    p.add_argument(
        "--all-points",
        action="store_true",
        help="train every point of a grid --config into --out/runs/<point> (with --resume: continue them)",
    )


def _print_summary(s: dict) -> None:
    from ..utils.format import fmt_pct

    rows = [
        ("run", s["run_dir"]),
        ("model / activation", f"{s['model']} / {s['activation']}"),
        ("dataset", s["dataset"]),
        ("epochs / steps", f"{s['epochs']} / {s['steps']}"),
        ("best val acc", fmt_pct(s["best_val_acc"], 2)),
        ("final val acc", fmt_pct(s["final_val_acc"], 2)),
    ]
    if s.get("test_acc") is not None:
        rows.append(("test acc", fmt_pct(s["test_acc"], 2)))
    rows.append(("diverged", f"yes, at step {s['diverged_step']}" if s["diverged"] else "no"))
    rows.append(("time", f"{s['time_s']:.1f} s on {s['world_size']} x {s['device']}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _all_points(args: argparse.Namespace, out: str | None, resume: bool) -> int:
    """Every point of a grid config, through the grid runner compare uses; a table at the end."""
    from ..training.config import ConfigError, grid_points
    from ..training.grid import GridRun, override_layer, plan_runs, run_grid
    from ..utils import RunDirLock, atomic_write_json
    from ..utils.format import fmt_pct
    from . import run_experiment

    if not (args.config and out):
        print("error: --all-points needs --config GRID_FILE and --out DIR (or --resume DIR)", file=sys.stderr)
        return 2

    def work() -> dict:
        with RunDirLock(out, "polyattn train --all-points", command="train --all-points"):
            runs = [GridRun(name, None, None, point=name) for name in grid_points(args.config)]
            planned = plan_runs(runs, args.config, override_layer(args.overrides), out, resume)
            records = run_grid(planned, progress=not args.no_progress, desc="points")
            summary = {"config": args.config, "overrides": args.overrides, "runs": records}
            atomic_write_json(summary, Path(out) / "results.json")
            return summary

    try:
        result = run_experiment(work, out)
    except ConfigError as e:
        return fail(e)
    if isinstance(result, int):
        return result
    width = max(len(r["name"]) for r in result["runs"])
    for r in result["runs"]:
        top1 = f"diverged at step {r['diverged_step']}" if r["diverged"] else fmt_pct(r["top1"], 2)
        print(f"{r['name']:<{width}}  {top1}  ({r['metric']}, {r['status']})")
    print(f"wrote {Path(out) / 'results.json'}")
    return 1 if any(r["diverged"] for r in result["runs"]) else 0


def run(args: argparse.Namespace) -> int:
    if args.list_points:
        return print_points(args.config)
    if args.all_points:
        return _all_points(args, args.resume or args.out, bool(args.resume))
    from ..training.config import ConfigError, dump_config, load_config
    from ..training.trainer import train

    def work() -> dict | int:
        if args.resume:
            if args.config:
                raise ConfigError("--resume reads RUN_DIR/config.yaml: drop --config (use --set to change keys)")
            if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
                raise ConfigError("--resume RUN_DIR continues in RUN_DIR: drop --out")
            saved = Path(args.resume) / "config.yaml"
            if not saved.is_file():
                raise FileNotFoundError(f"cannot resume: {saved} not found (is {args.resume} a run directory?)")
            # The trainer compares this with the checkpoint's config: it applies or refuses each change.
            cfg = load_config(saved, args.overrides)
        else:
            cfg = load_config(args.config, args.overrides, point=args.point)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        return train(cfg, args.resume or args.out, resume=bool(args.resume), progress=not args.no_progress)

    summary = run_training(work, "polyattn train --resume {run_dir}")
    if isinstance(summary, int):
        return summary
    if os.environ.get("RANK", "0") == "0":
        _print_summary(summary)
    return 1 if summary["diverged"] else 0
