"""``polyattn pinn``: train a transformer PINN (any attention activation) or an MLP PINN on a PDE."""

from __future__ import annotations

import argparse
import json
import sys

from . import add_point_arguments, add_set_argument, fail, print_points


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE", help="YAML config (configs/pinn/quick.yaml, paper.yaml); flags override it"
    )
    add_point_arguments(p)
    p.add_argument("--pde", choices=["convection", "reaction", "wave"], help="PDE (default convection)")
    p.add_argument("--activation", metavar="SPEC", help="attention activation, e.g. softmax, 'x^3/sqrt(N)'")
    p.add_argument("--model", choices=["pinnsformer", "mlp"], help="PINNsFormer or the plain MLP PINN")
    p.add_argument("--out", metavar="DIR", help="run directory (config, metrics, checkpoint, PNGs); required to train")
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN_DIR",
        help="instead of training: tabulate finished runs into DIR/comparison.md and DIR/<pde>.png",
    )
    p.add_argument("--quick", action="store_true", help="CPU preset: small grid and model, 20 L-BFGS steps")
    p.add_argument("--optimizer", choices=["lbfgs", "adam"], help="L-BFGS with strong Wolfe (default) or Adam")
    p.add_argument(
        "--steps",
        type=int,
        help="train.max_steps: optimizer steps (L-BFGS: each up to train.lbfgs_max_iter iterations)",
    )
    p.add_argument("--seed", type=int, help="seed for the initial weights")
    add_set_argument(p, "data.train_grid=[31,31] pde.params.beta=30")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoints/last.pt")
    p.add_argument("--threads", type=int, help="torch CPU threads (train.num_threads; --quick uses 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _overrides(args: argparse.Namespace) -> list[str]:
    """--set strings, then the flags (as dotted overrides: they win)."""
    over = list(args.overrides)
    for flag, key in (
        ("pde", "pde.name"),
        ("activation", "model.activation"),
        ("model", "model.name"),
        ("optimizer", "train.optimizer"),
        ("steps", "train.max_steps"),
        ("seed", "train.seed"),
        ("threads", "train.num_threads"),
    ):
        value = getattr(args, flag)
        if value is not None:
            over.append(f"{key}={json.dumps(value)}")
    return over


def run(args: argparse.Namespace) -> int:
    from ..experiments.pinn import compare_runs, resolve_pinn_config, run_pinn, summary_row
    from ..training.checkpoint import divergence_advice

    if args.list_points:
        return print_points(args.config)
    if not args.out:
        print("error: give --out DIR (the run directory, or with --compare the report folder)", file=sys.stderr)
        return 2
    if args.compare:
        from ..utils.outdir import check_out_dir, write_marker

        try:
            check_out_dir(args.out, "pinn --compare")  # the user's own files in --out are never overwritten
            print(compare_runs(args.compare, args.out), end="")
        except ValueError as e:
            return fail(e)
        write_marker(args.out, "pinn --compare")
        print(f"wrote {args.out}/comparison.md and one PNG per PDE")
        return 0

    try:
        cfg = resolve_pinn_config(args.config, _overrides(args), quick=args.quick, point=args.point)
    except ValueError as e:
        return fail(e)
    try:
        metrics = run_pinn(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    except ValueError as e:
        return fail(e)
    except KeyboardInterrupt:
        print(
            f"interrupted: {args.out}/checkpoints/last.pt keeps the last checkpoint (every "
            f"train.checkpoint_every={cfg['train']['checkpoint_every']} steps); continue with the same "
            "command plus --resume",
            file=sys.stderr,
        )
        return 130
    print(summary_row(metrics))
    if metrics["diverged"]:
        advice = divergence_advice(metrics["activation"])
        print(
            f"training stopped: the loss became non-finite. Try {advice}--optimizer adam with a smaller "
            f"--set train.lr=..., or another --seed. Details in {args.out}/metrics.json",
            file=sys.stderr,
        )
        return 1
    print(f"run directory: {args.out} (metrics.json, config.yaml, checkpoints/last.pt, fields.png, loss.png)")
    return 0
