"""The ``polyattn`` command line: a thin layer over functions also callable from Python.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so
``polyattn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from pathlib import Path
from typing import NoReturn

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


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line, like every other polyattn error (the usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


# Environment faults (a path, the disk, permissions): the fix is the user's, not a bug of polyattn's.
_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space, or choose another --out",
    errno.EDQUOT: "the disk quota is exceeded: free space, or choose another --out",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.EACCES: "permission denied: change its permissions, or choose another path",
    errno.EPERM: "operation not permitted: change its permissions, or choose another path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder, not a file: check the path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
}


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is the user's to fix (exit 2, one line) rather than a bug of polyattn's (a traceback).

    polyattn's own exception classes (ConfigError, DatasetError, RunDirError, the grid's error, ...) all
    derive from ValueError and each names a bad input; a plain ValueError, TypeError, KeyError or
    RuntimeError out of a command is a bug and keeps its traceback. OSErrors count when they are about
    the environment: a full disk, a read-only file system, permissions, a missing path.
    """
    if isinstance(e, OSError):
        return e.errno in _OS_FIXES
    cls = type(e)
    return isinstance(e, ValueError) and cls is not ValueError and cls.__module__.startswith("polyattn.")


def error_line(e: BaseException) -> str:
    """``e`` as one line: the problem, then the fix.

    Library messages may run over several lines (an activation error lists every accepted form, a dataset
    error draws the expected layout); on the terminal they become one line that points at the rest.
    """
    if isinstance(e, OSError) and e.errno in _OS_FIXES:
        where = f"{e.filename}: " if e.filename else ""
        return f"error: {where}{_OS_FIXES[e.errno]}"
    text = str(e).strip()
    from .core.activations import list_activations

    forms = "\n  ".join(list_activations())
    if text.endswith(forms):  # the list of accepted forms: `polyattn activations` prints it
        text = text[: -len(forms)].rstrip().removesuffix("accepted forms:").rstrip(" .:\n")
        text += " (polyattn activations lists the accepted forms)"
    layout = getattr(e, "layout", "")
    if layout and "\nexpected layout:\n" in text:
        head, _, rest = text.partition("\nexpected layout:\n")
        hint = rest.splitlines()[len(layout.strip("\n").splitlines()) :]
        drawn = "; ".join(" ".join(line.split()) for line in layout.strip("\n").splitlines())
        text = "; ".join([head, *hint, f"expected layout: {drawn}"])
    return "error: " + " ".join(text.split())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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


def _bookkeeping(name: str) -> bool:
    # What polyattn puts in a folder before any result: its marker, the lock, unfinished temporary files.
    return name in (".polyattn", ".lock") or name.endswith(".tmp")


class _OutBefore:
    """What ``--out`` held before a command ran, to take back its bookkeeping when the command refuses."""

    def __init__(self, args: argparse.Namespace) -> None:
        out = getattr(args, "out", None)
        self.path = Path(out) if isinstance(out, str) and out else None
        self.entries: set[str] | None = None  # None: the folder did not exist
        if self.path is not None and self.path.is_dir():
            self.entries = set(os.listdir(self.path))

    def undo(self) -> None:
        """Remove the marker, lock and temporary files the command added, and the folder when it made it.

        Only when nothing else was added: a command that wrote results of its own (a checkpoint before a
        full disk, say) keeps them, and its message says what they are good for.
        """
        p = self.path
        if p is None or not p.is_dir() or os.environ.get("RANK", "0") != "0":
            return
        try:
            added = set(os.listdir(p)) - (self.entries or set())
            if not all(_bookkeeping(n) and (p / n).is_file() for n in added):
                return
            for n in added:
                (p / n).unlink()
            if self.entries is None:
                p.rmdir()
        except OSError:
            pass  # a folder it cannot clean is no worse than before; the error line already went out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a mistake argparse reported in one line: its status
        return e.code if isinstance(e.code, int) else 0
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "point", None) and not getattr(args, "config", None):
        # Without a grid file the point would be ignored and the default run trained instead.
        print(f"error: --point {args.point} names a run of a grid file: give --config FILE too", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    out = _OutBefore(args)
    try:
        code = int(module.run(args) or 0)
    except KeyboardInterrupt:
        # Commands that train say what their checkpoint keeps; the others rewrite their own folder in full.
        partial = out.path is not None and out.path.is_dir() and any(out.path.iterdir())
        tail = f": {out.path} may be incomplete; run the same command again to write it anew" if partial else ""
        print(f"interrupted{tail}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        if not is_user_error(e):
            raise
        print(error_line(e), file=sys.stderr)
        code = 2
    if code == 2:  # a refused input leaves --out as it found it
        out.undo()
    return code


if __name__ == "__main__":
    sys.exit(main())
