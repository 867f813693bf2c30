"""``polyattn theory``: check the paper's Theorems 4.1-4.5 numerically."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import fail, int_list, str_list


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/theory", help="output directory (default: runs/theory)")
    p.add_argument("--quick", action="store_true", help="smaller grids and fewer samples (about 10-30 s)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0); same seed, same numbers")
    p.add_argument("--config", default=None, help="YAML file with any of the settings below (keys as in config.yaml)")
    g = p.add_argument_group("Theorems 4.2/4.4 Monte Carlo")
    g.add_argument("--n-grid", type=int_list, default=None, help="sequence lengths N (default 8,16,...,1024)")
    g.add_argument("--samples", type=int, default=None, help="draws of (X, Q, K) per N (default 100)")
    g.add_argument("--D", dest="D", type=int, default=None, help="model width, columns of X (default 64)")
    g.add_argument("--d", dest="d", type=int, default=None, help="head width, columns of Q and K (default 16)")
    g.add_argument("--sigma-x", type=float, default=None, help="std of the entries of X (default 1)")
    g.add_argument(
        "--sigma-t",
        type=float,
        default=None,
        help="std of the entries of Q and K (default 1/sqrt(D): unit-variance scores)",
    )
    g.add_argument(
        "--activations",
        type=str_list,
        default=None,
        help="comma-separated activation specs (default softmax,x,x^3,x/sqrt(N),x^3/sqrt(N))",
    )
    g = p.add_argument_group("Theorem 4.1")
    g.add_argument("--bound-n", type=int_list, default=None, help="matrix sizes N (default 2,4,...,4096)")
    g.add_argument("--bound-samples", type=int, default=None, help="matrices per family and N (default 2)")
    p.add_argument(
        "--threads", dest="num_threads", type=int, default=None, help="torch threads while running (default 1)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


_FIELDS = (
    "seed",
    "n_grid",
    "samples",
    "D",
    "d",
    "sigma_x",
    "sigma_t",
    "activations",
    "bound_n",
    "bound_samples",
    "num_threads",
)


def build_config(args: argparse.Namespace) -> Any:
    """Defaults < --quick < --config file < explicit options."""
    from ..experiments.theory import QUICK, TheoryConfig

    data: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.config:
        from ..training.config import read_config_file

        loaded = read_config_file(args.config)  # a mapping of theory settings such as 'samples: 64'; may inherit
        data.update(loaded)
    data.update({k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None})
    return TheoryConfig.from_dict(data).resolved()


def run(args: argparse.Namespace) -> int:
    from ..experiments.report.theory import format_report
    from ..experiments.theory import run_theory

    try:
        cfg = build_config(args)
    except ValueError as e:
        return fail(e)
    from ..utils import OutDirError, prepare_out_dir

    try:
        prepare_out_dir(args.out, "theory")
    except OutDirError as e:
        return fail(e)
    results = run_theory(cfg, args.out, progress=not args.no_progress, plots=not args.no_plots)
    print(format_report(results))
    t = results["timing"]
    print(
        f"\nwrote {Path(args.out) / 'results.json'}, report.txt, config.yaml"
        + (f" and {', '.join(results['plots'])}" if results.get("plots") else "")
        + f" ({t['total_s']:.1f} s)"
    )
    # A violated bound is a failure a script should notice.
    return 0 if results["theorem_4_1"]["holds"] else 1
