"""One module per CLI subcommand: argument parsing and printing only, the work is done elsewhere."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any


def fail(e: BaseException) -> int:
    """Exit status 2 after ``e`` as one line on stderr (see :func:`polyattn.cli.error_line`)."""
    from ..cli import error_line

    print(error_line(e), file=sys.stderr)
    return 2


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


def add_grid_arguments(p: argparse.ArgumentParser, default_activations: str) -> None:
    """``--activations SPEC ...`` and ``--seeds``: the two axes of every comparison grid."""
    p.add_argument(
        "--activations",
        nargs="+",
        default=None,
        metavar="SPEC",
        help=f"activation specs, comma- or space-separated (default: {default_activations}); "
        "quote specs with parentheses in a shell",
    )
    p.add_argument(
        "--seeds",
        default="3",
        help="a count (3: seeds 0,1,2) or a comma list of train.seed values (0,5,7; one seed: 5,) (default 3)",
    )


def add_jobs_argument(p: argparse.ArgumentParser) -> None:
    """``--jobs N|auto``: how many runs of a grid train at once, one process each."""
    p.add_argument(
        "--jobs",
        default="auto",
        metavar="N",
        help="runs trained at once, one process each (default auto: one per CPU core at the config's "
        "train.num_threads; 1 on a GPU). A run's numbers do not depend on it",
    )


def int_list(text: str, positive: bool = False) -> list[int]:
    """argparse type for ``8,16,32``: comma-separated integers, at least one (``positive``: all >= 1)."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 8,16,32, got {text!r}") from None
    if not values or (positive and min(values) < 1):
        raise argparse.ArgumentTypeError(f"expected at least one {'positive ' if positive else ''}integer")
    return values


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type for a whole number >= ``minimum`` (a count: images, workers, threads)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in its messages
    return parse


def str_list(text: str) -> list[str]:
    """argparse type for ``softmax,x^3/sqrt(N)``: comma-separated names, blanks dropped."""
    return [v.strip() for v in text.split(",") if v.strip()]


def positive_int_list(text: str) -> list[int]:
    return int_list(text, positive=True)


def add_point_arguments(p: argparse.ArgumentParser) -> None:
    """``--point NAME`` and ``--list-points``: one run of a grid config file (configs/table2.yaml, ...)."""
    p.add_argument("--point", metavar="NAME", help="the run to take from a grid --config (see --list-points)")
    p.add_argument("--list-points", action="store_true", help="list the runs of a grid --config and exit")


def print_points(config: str | None) -> int:
    """Print the points of a grid config file, one per line; the exit code."""
    from ..training.config import ConfigError, grid_points

    try:
        if not config:
            raise ConfigError("--list-points needs --config FILE (a grid file such as configs/table2.yaml)")
        points = grid_points(config)
    except ConfigError as e:
        return fail(e)
    print(f"{config}: {len(points)} points (run one with --point NAME)")
    for name in points:
        print(f"  {name}")
    return 0


def run_training(work: Callable[[], Any], resume_command: str, errors: tuple[type, ...] = ()) -> Any:
    """``work()``'s result, or an exit code after one clear line: 2 for a bad input, 130 for Ctrl-C.

    For commands that train one run: after Ctrl-C the line says what the checkpoint holds and gives
    ``resume_command`` (``{run_dir}`` is filled in). Only rank 0 prints under torchrun.
    """
    from ..data.errors import DatasetError
    from ..training.config import ConfigError
    from ..training.trainer import TrainingInterrupted
    from ..utils.rundir import RunDirError

    try:
        return work()
    except (ConfigError, DatasetError, RunDirError, FileNotFoundError, *errors) as e:
        return fail(e)
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") == "0":
            print(e.advice(resume_command.format(run_dir=e.run_dir)), file=sys.stderr)
        return 130


def run_experiment(work: Callable[[], dict], out: str) -> dict | int:
    """``work()``'s results, or the exit code after one clear line: 2 for a bad input, 130 for Ctrl-C.

    For commands that train a grid of runs into ``out``: an interruption keeps the finished runs,
    and the message says how to continue them.
    """
    from ..data.errors import DatasetError
    from ..training.config import ConfigError
    from ..training.grid import GridError
    from ..utils.rundir import RunDirError

    try:
        return work()
    except (GridError, ConfigError, DatasetError, RunDirError, FileNotFoundError) as e:
        return fail(e)
    except KeyboardInterrupt:
        print(
            f"interrupted: finished runs are kept; continue with the same command plus --resume (--out {out})",
            file=sys.stderr,
        )
        return 130


def grid_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments every grid command (compare, sweep, recall) passes on as given: the base
    config, --set, --resume, the progress bars and --jobs."""
    return {
        "config": args.config,
        "overrides": args.overrides,
        "resume": args.resume,
        "progress": not args.no_progress,
        "jobs": args.jobs,
    }


def print_experiment(results: dict | int, wrote: Callable[[dict], str]) -> int:
    """The exit code of a grid command, given :func:`run_experiment`'s answer; for results, prints their
    table, the files written (``wrote(results)``), their notes and the time taken."""
    if isinstance(results, int):
        return results
    print(f"\n{results['table_text']}")
    print(f"\nwrote {wrote(results)}")
    for note in results.get("notes", []):
        print(f"note: {note}")
    print(f"({results['time_s'] / 60:.1f} min)")
    return 0
