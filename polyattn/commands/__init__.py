"""One module per CLI subcommand: argument parsing and printing only, the work is done elsewhere."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


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


def run_experiment(work: Callable[[], dict], out: str) -> dict | int:
    """``work()``'s results, or the exit code after one clear line: 2 for a bad input, 130 for Ctrl-C.

    For commands that train a grid of runs into ``out``: an interruption keeps the finished runs,
    and the message says how to continue them.
    """
    from ..data.errors import DatasetError
    from ..experiments.compare import CompareError
    from ..training.config import ConfigError
    from ..utils.rundir import RunDirError

    try:
        return work()
    except (CompareError, ConfigError, DatasetError, RunDirError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: finished runs are kept; continue with the same command plus --resume (--out {out})",
            file=sys.stderr,
        )
        return 130
