"""``polyattn lra --task TASK --activation SPEC [--data DIR] [--preset cpu] [--protocol P] --out RUN_DIR``.

Trains the Nystromformer LRA encoder on one Long Range Arena task with the
polyattn trainer (progress bar, metrics.jsonl, checkpoints, resume, torchrun)
and reports the test accuracy next to the paper's Table 4.
``--table RUN_DIR ...`` tabulates finished runs instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import add_point_arguments, add_set_argument, print_points, run_training

TASK_NAMES = ("listops", "text", "retrieval", "image", "pathfinder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=TASK_NAMES, help="LRA task")
    p.add_argument("--activation", default="softmax", metavar="SPEC", help="attention activation (default softmax)")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="dataset folder (see docs/lra.md for each layout); ListOps and Pathfinder without it: "
        "generated into $POLYATTN_CACHE or ~/.cache/polyattn and reused",
    )
    p.add_argument(
        "--preset",
        choices=["cpu"],
        help="reduced scale that runs in minutes on a CPU: listops (learns), pathfinder (a pipeline check, at chance)",
    )
    p.add_argument(
        "--protocol",
        choices=["nystromformer", "polyattn"],
        help="nystromformer: token id 0 is padding, mean over the padded length, OneCycleLR (linear), test "
        "score of the best validation checkpoint; polyattn: the padding mask, mean over valid tokens, warmup + "
        "cosine, final weights (default: nystromformer at full scale, polyattn with --preset cpu)",
    )
    p.add_argument(
        "--config", metavar="FILE.yaml", help="config file instead of the task's settings (configs/lra/*.yaml)"
    )
    add_point_arguments(p)
    add_set_argument(p, "train.max_steps=1000 data.num_train=20000")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (with --table: a Markdown file to write)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--table", nargs="+", metavar="RUN_DIR", help="tabulate finished runs (lra_result.json) and exit")


def _config(args: argparse.Namespace) -> dict:
    from ..experiments.lra import PROTOCOLS, lra_config
    from ..training.config import apply_overrides, load_config, merge_configs, read_config_file, resolve_config

    protocol = getattr(args, "protocol", None)
    if args.resume:
        if protocol:
            raise ValueError("--protocol cannot change on --resume: the run keeps the protocol it started with")
        saved = Path(args.out) / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} not found (is {args.out} a run directory?)")
        return load_config(saved, list(args.overrides))
    if args.config:
        raw = read_config_file(args.config, args.point)
        if protocol:  # before --set, so that an explicit key still wins over the protocol's
            raw = merge_configs(raw, PROTOCOLS[protocol])
        extra = list(args.overrides) + ([f"data.root={args.data}"] if args.data else [])
        return resolve_config(apply_overrides(raw, extra))
    if not args.task:
        raise ValueError("give --task (or --config FILE, or --table RUN_DIR ...)")
    return lra_config(args.task, args.activation, args.data, args.preset, args.overrides, protocol=protocol)


def _print_result(r: dict) -> None:
    from ..experiments.lra import PAPER_DID_NOT_TRAIN
    from ..utils.format import fmt_pct

    rows = [
        ("task / activation", f"{r['task']} / {r['activation']}"),
        ("protocol", r.get("protocol", "polyattn")),
        ("test accuracy", "diverged" if r["diverged"] else fmt_pct(r["test_acc"], 2)),
        ("majority class", fmt_pct(r["majority_acc"], 2)),
        (
            "paper (Table 4)",
            ("did not train" if r["activation"] in PAPER_DID_NOT_TRAIN else fmt_pct(r["paper_test_acc"], 2))
            + ("  (full scale; this run is reduced)" if r["reduced_scale"] else ""),
        ),
        ("selected epoch", str(r.get("selected_epoch"))),
        ("steps", str(r["steps"])),
        ("run directory", r["run_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if r["steps_short"]:
        print(
            "note: the training set is smaller than the official one, so train.epochs ran out before "
            "train.max_steps; raise train.epochs to train the full number of steps",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    from ..experiments.lra import lra_table, run_lra
    from ..training.config import dump_config
    from ..utils.io import atomic_write_text
    from ..utils.outdir import check_out_file

    def work() -> dict | int:
        if args.list_points:
            return print_points(args.config)
        if args.table:
            if args.out:
                check_out_file(args.out, "lra --table")  # before reading the runs: a refusal writes nothing
            text = lra_table(args.table)
            if args.out:
                atomic_write_text(text, args.out)
            print(text, end="")
            return 0
        cfg = _config(args)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        if not args.out:
            raise ValueError("give --out RUN_DIR")
        return run_lra(cfg, args.out, resume=args.resume, progress=not args.no_progress)

    result = run_training(work, "polyattn lra --resume --out {run_dir}", errors=(ValueError,))
    if isinstance(result, int):
        return result
    if os.environ.get("RANK", "0") == "0":
        _print_result(result)
    return 1 if result["diverged"] else 0
