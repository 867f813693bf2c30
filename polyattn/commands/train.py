"""``polyattn train --config FILE.yaml [--set key=value ...] [--out RUN_DIR] [--resume RUN_DIR]``.

Under ``torchrun --nproc_per_node=N -m polyattn train ...`` every process runs
this command and trains one DDP replica; rank 0 writes the run directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import add_set_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="config file (default: vit_micro on digits)")
    add_set_argument(p, "train.epochs=5 model.activation='x^3/sqrt(N)'")
    p.add_argument(
        "--out", metavar="RUN_DIR", help="run directory (default: runs/<model>_<data>_<activation>_<time>)"
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars or per-epoch lines (the summary is still printed)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _print_summary(s: dict) -> None:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    rows = [
        ("run", s["run_dir"]),
        ("model / activation", f"{s['model']} / {s['activation']}"),
        ("dataset", s["dataset"]),
        ("epochs / steps", f"{s['epochs']} / {s['steps']}"),
        ("best val acc", pct(s["best_val_acc"])),
        ("final val acc", pct(s["final_val_acc"])),
    ]
    if s.get("test_acc") is not None:
        rows.append(("test acc", pct(s["test_acc"])))
    rows.append(("diverged", f"yes, at step {s['diverged_step']}" if s["diverged"] else "no"))
    rows.append(("time", f"{s['time_s']:.1f} s on {s['world_size']} x {s['device']}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def run(args: argparse.Namespace) -> int:
    from ..data.errors import DatasetError
    from ..training.config import ConfigError, dump_config, load_config
    from ..training.trainer import RunDirError, TrainingInterrupted, train

    try:
        if args.resume:
            if args.config:
                raise ConfigError(
                    "--resume reads RUN_DIR/config.yaml: drop --config (use --set to change keys)"
                )
            if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
                raise ConfigError("--resume RUN_DIR continues in RUN_DIR: drop --out")
            saved = Path(args.resume) / "config.yaml"
            if not saved.is_file():
                raise FileNotFoundError(
                    f"cannot resume: {saved} not found (is {args.resume} a run directory?)"
                )
            # The trainer compares this with the checkpoint's config: it applies or refuses each change.
            cfg = load_config(saved, args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        summary = train(cfg, args.resume or args.out, resume=bool(args.resume), progress=not args.no_progress)
    except (ConfigError, DatasetError, RunDirError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") == "0":
            print(e.advice(f"polyattn train --resume {e.run_dir}"), file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":
        _print_summary(summary)
    return 1 if summary["diverged"] else 0
