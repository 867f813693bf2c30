"""``polyattn sweep``: accuracy against the scale 1/k of x^3 for several sequence lengths (the paper's Figure 1).

The work is :func:`polyattn.experiments.sweep.sweep`; this module parses flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_jobs_argument, add_set_argument, grid_options, print_experiment, run_experiment

DEFAULT_OUT = "runs/sweep"


def _numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,2,4,8, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,2,1, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults (None here) live in polyattn.experiments.sweep; importing it here would slow every --help.
    p.add_argument(
        "--scales", type=_numbers, default=None, help="k values: the activation is x^P/k (default 1,2,4,8,16,32,64)"
    )
    p.add_argument(
        "--patch-sizes",
        type=_ints,
        default=None,
        help="ViT patch sizes, i.e. sequence lengths (default 8,4,2,1: 4, 16, 64, 256 patches of the digits "
        "resized to 16x16)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="data.image_size: resize the images to this side (default 16; 0: the config's own size)",
    )
    p.add_argument("--power", type=int, default=3, help="P in x^P/k (default 3)")
    p.add_argument("--seeds", default="1", help="a count (2: seeds 0,1) or a comma list (0,5,7; one seed: 5,)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the base config's, 15)")
    p.add_argument("--no-baseline", action="store_true", help="no softmax reference run per patch size")
    p.add_argument("--dataset", default=None, help="data.name (default: digits); must be an image dataset")
    p.add_argument("--model", default=None, help="model.name (default: vit_micro)")
    p.add_argument("--config", metavar="FILE.yaml", default=None, help="base config (default: as polyattn compare)")
    add_set_argument(p, "train.lr=1e-3")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--resume", action="store_true", help="reuse finished runs in --out, continue interrupted ones")
    add_jobs_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..experiments.sweep import DEFAULT_SWEEP_IMAGE_SIZE, sweep

    # Flags left out take sweep()'s own defaults.
    given = {"scales": args.scales, "patch_sizes": args.patch_sizes, "epochs": args.epochs}
    defaults = {k: v for k, v in given.items() if v is not None}
    image_size = DEFAULT_SWEEP_IMAGE_SIZE if args.image_size is None else (args.image_size or None)
    results = run_experiment(
        lambda: sweep(
            args.out,
            power=args.power,
            seeds=args.seeds,
            image_size=image_size,
            dataset=args.dataset,
            model=args.model,
            baseline=not args.no_baseline,
            **defaults,
            **grid_options(args),
        ),
        args.out,
    )
    out = Path(args.out)
    return print_experiment(results, lambda r: f"{out / 'report.md'}, {out / 'results.json'} and {out / 'sweep.png'}")
