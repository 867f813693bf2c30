"""One module per CLI subcommand: argument parsing and printing only, the work is done elsewhere."""

from __future__ import annotations

import argparse


def add_set_argument(p: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE ...``: config overrides, the same flag in every command that trains."""
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help=f"override config keys, e.g. --set {example}",
    )
