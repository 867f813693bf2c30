"""``polyattn detect``: Mask R-CNN with a polynomial-attention XCiT backbone on COCO (the paper's Table 3).

On several GPUs: ``torchrun --nproc_per_node=8 -m polyattn detect ...`` (one DDP replica per process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import add_point_arguments, add_set_argument, fail, print_points


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (configs/detect/table3.yaml); flags override it")
    add_point_arguments(p)
    p.add_argument("--data", metavar="DIR", help="COCO root (annotations/, train2017/, val2017/); default: generated")
    p.add_argument("--activation", metavar="SPEC", help="attention activation, e.g. softmax, 'x^3/14'")
    p.add_argument("--preset", choices=["paper", "cpu"], help="paper: Table 3's recipe; cpu: nano XCiT on shapes")
    add_set_argument(p, "train.epochs=2 data.short_side=[640,800]")
    p.add_argument("--out", metavar="DIR", help="run directory (config, checkpoints, metrics, report); required")
    p.add_argument("--resume", action="store_true", help="continue DIR from its last checkpoint")
    p.add_argument("--table", nargs="+", metavar="RUN_DIR", help="instead of training: tabulate runs as Table 3")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    if args.list_points:
        return print_points(args.config)
    try:
        from ..experiments.detection.config import resolve_detect_config
        from ..experiments.detection.loop import run_detect
        from ..experiments.detection.report import detect_table
    except ImportError as e:
        print(f"error: {e}; install the detection extra: pip install 'polyattn[detect]'", file=sys.stderr)
        return 2
    from ..data.errors import DatasetError
    from ..training.config import ConfigError
    from ..utils.rundir import RunDirError

    try:
        if args.table:
            print(detect_table(args.table))
            return 0
        if not args.out:
            raise ConfigError("--out DIR is required: the run directory for config, checkpoints and metrics")
        over = list(args.overrides)
        for value, key in ((args.data, "data.root"), (args.activation, "model.activation")):
            if value is not None:
                over.append(f"{key}={json.dumps(value)}")
        cfg = resolve_detect_config(args.config, over, preset=args.preset, point=args.point)
        metrics = run_detect(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, DatasetError, RunDirError, FileNotFoundError) as e:
        return fail(e)
    except KeyboardInterrupt:
        print(f"interrupted: {args.out}/checkpoints/last.pt keeps the last finished epoch; continue with "
              f"the same command plus --resume", file=sys.stderr)  # fmt: skip
        return 130
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 1 if metrics["diverged"] else 0
    b, m = metrics.get("bbox", {}), metrics.get("segm", {})
    print(f"box AP {100 * b.get('AP', 0):.1f}  mask AP {100 * m.get('AP', 0):.1f}  ({metrics['epochs']} epochs)")
    if metrics["diverged"]:
        print(metrics["diverged_message"])
    print(f"wrote {args.out}/metrics.json, report.md, predictions.png")
    return 1 if metrics["diverged"] else 0
