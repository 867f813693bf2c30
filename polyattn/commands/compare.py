"""``polyattn compare``: one model per activation and seed, the comparison table and report.md.

The work is :func:`polyattn.experiments.compare.compare`; this module parses flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_grid_arguments, add_jobs_argument, add_set_argument, grid_options, print_experiment, run_experiment

DEFAULT_OUT = "runs/compare"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_grid_arguments(p, "softmax,x^3/sqrt(N),x^3/16,x^3,x/sqrt(N),x/16,x")
    p.add_argument("--dataset", default=None, help="data.name (default: digits, from the base config)")
    p.add_argument("--model", default=None, help="model.name (default: vit_micro, from the base config)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the base config's, 15)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=None,
        help="base config (default: built-in vit_micro on digits, patch 1, 15 epochs = configs/digits_vit_micro.yaml)",
    )
    add_set_argument(p, "train.lr=1e-3 model.overrides.depth=2")
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the runs already finished in --out and continue interrupted ones from their checkpoints",
    )
    p.add_argument(
        "--norm-every",
        type=int,
        default=None,
        help="record attention norms every K steps (default 5; 0: no norm curves) unless the config sets it",
    )
    add_jobs_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..experiments.compare import DEFAULT_ACTIVATIONS, DEFAULT_NORM_EVERY, compare

    results = run_experiment(
        lambda: compare(
            args.out,
            activations=args.activations or DEFAULT_ACTIVATIONS,
            seeds=args.seeds,
            dataset=args.dataset,
            model=args.model,
            epochs=args.epochs,
            norm_every=DEFAULT_NORM_EVERY if args.norm_every is None else args.norm_every,
            **grid_options(args),
        ),
        args.out,
    )
    out = Path(args.out)

    def wrote(results: dict) -> str:
        figs = results.get("figures", {})
        return f"{out / 'report.md'}, {out / 'results.json'}" + (f" and {len(figs)} figure(s) in {out}" if figs else "")

    return print_experiment(results, wrote)
