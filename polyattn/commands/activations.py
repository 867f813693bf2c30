"""``polyattn activations [SPEC ...]``."""

from __future__ import annotations

import argparse

from ..core.activations import get_activation, list_activations
from . import fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="*", metavar="SPEC", help="spec strings to check, e.g. 'x^3/sqrt(N)'")


def run(args: argparse.Namespace) -> int:
    if not args.specs:
        print("Activation spec forms (whitespace and case are ignored):")
        for line in list_activations():
            print("  " + line)
        return 0
    status = 0
    for spec in args.specs:
        try:
            act = get_activation(spec)
        except ValueError as e:
            fail(e)
            status = 2
            continue
        kind = "row-normalised" if act.is_softmax else "elementwise"
        div = {None: "none", "const": f"constant {act.constant:g}"}.get(act.divisor, f"dynamic {act.divisor}")
        shift = f", shift: -{act.shift} per row" if act.shift else ""
        print(f"{spec!r} -> {act.spec}  ({kind}, divisor: {div}{shift})")
    return status
