"""The ``polyattn`` command line: a thin layer over functions also callable from Python.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so
``polyattn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "activations": ("polyattn.commands.activations", "list the activation spec forms, or check one spec"),
    "bench": ("polyattn.commands.bench", "time/memory of SDPA softmax vs each backend; --model: training"),
    "compare": ("polyattn.commands.compare", "train one model per activation and seed: table, report.md, plots"),
    "detect": ("polyattn.commands.detect", "Mask R-CNN with a polynomial-attention XCiT backbone on COCO (Table 3)"),
    "data": ("polyattn.commands.data", "generate data in official file layouts: LRA ListOps, Pathfinder, COCO shapes"),
    "kernels": ("polyattn.commands.kernels", "compile each Triton kernel config for sm_80/sm_90: registers, spills"),
    "lra": ("polyattn.commands.lra", "train the LRA encoder on a Long Range Arena task (Table 4)"),
    "pinn": ("polyattn.commands.pinn", "physics-informed transformer (PINNsFormer) or MLP PINN on a PDE"),
    "recall": ("polyattn.commands.recall", "causal attention on multi-query associative recall (MQAR) per length"),
    "sweep": ("polyattn.commands.sweep", "accuracy against the scale 1/k of x^3 per sequence length (Figure 1)"),
    "theory": ("polyattn.commands.theory", "check the paper's norm theorems (4.1-4.5) numerically"),
    "train": ("polyattn.commands.train", "train a model from a config file (DDP under torchrun)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyattn",
        description="Softmax-free attention: train, compare, diagnose and benchmark attention activations.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"polyattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
