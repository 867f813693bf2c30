"""The one rule for every command's output directory (``--out``).

polyattn writes into a directory only when it is

* new or empty (nothing but a stale ``.lock``), or
* one of polyattn's own runs of the same command (then the command's own
  ``--resume`` / reuse rules decide what happens to its files);

otherwise it refuses before writing anything, naming the files it would
overwrite. A directory is polyattn's own run of a command when its marker file
``.polyattn`` (written when the run starts) names that command, or, for
directories made before the marker existed, when it holds the command's own
files (``LEGACY`` below), e.g. ``checkpoints/`` for ``polyattn train``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .rundir import RunDirError

__all__ = [
    "COMMANDS",
    "MARKER",
    "OutDirError",
    "check_out_dir",
    "check_out_file",
    "marked_command",
    "prepare_out_dir",
    "write_marker",
]

MARKER = ".polyattn"

# What each command recognises as its own run when the marker is missing (directories made by
# earlier versions): every listed path (a glob pattern) must match.
LEGACY: dict[str, tuple[str, ...]] = {
    "train": ("checkpoints",),
    "train --all-points": ("runs",),
    "compare": ("runs",),
    "sweep": ("runs",),
    "recall": ("base_config.yaml",),
    "pinn": ("config.yaml", "checkpoints"),
    "detect": ("config.yaml", "checkpoints"),
    "bench": ("config.yaml", "results.json", "report.txt"),
    "theory": ("config.yaml", "results.json", "report.txt"),
    "data listops": ("basic_train.tsv",),
    "data pathfinder": ("curv_*/metadata",),
    "data coco-shapes": ("annotations",),
    "kernels": ("kernels.json", "kernels.txt"),
    "pinn --compare": ("comparison.md", "*.png"),
}

# The top-level names each command writes: the files a refusal names.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "train": ("config.yaml", "summary.json", "metrics.jsonl", "checkpoints", "report.md"),
    "train --all-points": ("runs", "results.json"),
    "compare": ("runs", "report.md", "results.json"),
    "sweep": ("runs", "report.md", "results.json", "sweep.png"),
    "recall": ("base_config.yaml", "report.md", "results.json", "recall.png"),
    "pinn": ("config.yaml", "metrics.json", "checkpoints", "prediction.npz", "fields.png", "loss.png"),
    "detect": ("config.yaml", "metrics.json", "history.json", "checkpoints", "report.md", "predictions.png"),
    "bench": ("config.yaml", "results.json", "report.txt"),
    "theory": ("config.yaml", "results.json", "report.txt", "theorem_4_1.png"),
    "data listops": ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"),
    "data pathfinder": ("curv_baseline", "curv_contour_length_9", "curv_contour_length_14"),
    "data coco-shapes": ("annotations", "train2017", "val2017"),
    "kernels": ("kernels.json", "kernels.txt"),
    "pinn --compare": ("comparison.md", "convection.png", "reaction.png", "wave.png"),
}

# Commands whose --out is one file: how the file polyattn wrote begins (it carries no marker of its own).
FILE_HEADS: dict[str, str] = {
    "lra --table": "| task | activation | seed |",
}

COMMANDS = tuple(LEGACY)

# Resume hints per command (None: the command has no --resume; rerunning it rewrites its own run).
_RESUME = {
    "train": "--resume DIR",
    "compare": "--resume",
    "sweep": "--resume",
    "recall": "--resume",
    "pinn": "--resume",
    "detect": "--resume",
    "train --all-points": "--resume DIR",
}


class OutDirError(RunDirError):
    """An ``--out`` that polyattn must not write into (a file, read-only, or someone else's files)."""


def _ignored(name: str) -> bool:
    # The lock of a killed run and the temporary files of interrupted atomic writes carry no data.
    return name in (".lock", MARKER) or (name.startswith(".") and name.endswith(".tmp"))


def marked_command(directory: str | os.PathLike) -> str | None:
    """The command named by ``directory``'s marker file, or None without one."""
    try:
        return (Path(directory) / MARKER).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _is_own(d: Path, command: str) -> bool:
    marked = marked_command(d)
    if marked is not None:
        return marked == command
    legacy = LEGACY[command]
    return bool(legacy) and all(next(d.glob(pattern), None) is not None for pattern in legacy)


def _fix(command: str) -> str:
    hint = _RESUME.get(command)
    fix = "choose another --out (a new or empty folder)"
    if hint:
        fix += f", or point polyattn {command} {hint} at one of its own runs"
    return fix


def check_out_dir(directory: str | os.PathLike, command: str) -> bool:
    """Raise :class:`OutDirError` unless ``polyattn command`` may write into ``directory``.

    Returns True when the directory is (or would be) new or empty, False when it
    is already one of the command's own runs. Creates nothing.
    """
    if command not in LEGACY:
        raise ValueError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise OutDirError(f"{d} is a file, not a run directory: {_fix(command)}")
    if not d.exists():
        _check_parent(d, "--out")
        return True
    if not os.access(d, os.W_OK | os.X_OK):
        raise OutDirError(f"--out {d} is not writable: make it writable or choose another --out")
    entries = sorted(p.name for p in d.iterdir() if not _ignored(p.name))
    if not entries:
        return True
    if _is_own(d, command):
        return False
    marked = marked_command(d)
    if marked is not None:
        raise OutDirError(f"--out {d} is a polyattn {marked} run, not a {command} run: {_fix(command)}")
    clash = [n for n in entries if n in OUTPUTS[command]]
    named = ", ".join((clash or entries)[:6]) + (" ..." if len(clash or entries) > 6 else "")
    what = f"would overwrite {named}" if clash else f"holds {named}"
    raise OutDirError(f"--out {d} is not empty and not a polyattn {command} run (polyattn {what}): {_fix(command)}")


def _check_parent(path: Path, what: str) -> None:
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise OutDirError(f"cannot create {what} {path}: {parent} is a file; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutDirError(f"cannot create {what} {path}: {parent} is not writable; choose another --out")


def check_out_file(path: str | os.PathLike, command: str) -> None:
    """Raise :class:`OutDirError` unless ``polyattn command`` may write its one output file ``path``.

    The file rule mirrors the folder rule: a new file, or one this command wrote before (recognised by
    how it begins, ``FILE_HEADS``), which it writes again; anything else is the user's and is refused.
    """
    if command not in FILE_HEADS:
        raise ValueError(f"unknown command {command!r}; one of {', '.join(FILE_HEADS)}")
    p = Path(path)
    if p.is_dir():
        raise OutDirError(f"--out {p} is a folder: polyattn {command} writes one file; name a file")
    if not p.exists():
        _check_parent(p, "--out")
        return
    try:
        with open(p, encoding="utf-8") as f:
            head = f.read(len(FILE_HEADS[command]))
    except (OSError, UnicodeDecodeError):
        head = ""
    if head != FILE_HEADS[command]:
        raise OutDirError(
            f"--out {p} exists and is not a table polyattn {command} wrote (polyattn would overwrite it): "
            "choose another --out (a new file)"
        )
    if not os.access(p, os.W_OK):
        raise OutDirError(f"--out {p} is not writable: make it writable or choose another --out")


def write_marker(directory: str | os.PathLike, command: str) -> bool:
    """Write ``directory``'s marker naming ``command`` unless it is there; True when this call wrote it."""
    path = Path(directory) / MARKER
    if path.exists():
        return False
    path.write_text(command + "\n", encoding="utf-8")
    return True


def prepare_out_dir(directory: str | os.PathLike, command: str) -> Path:
    """Check ``directory`` for ``command`` (see :func:`check_out_dir`), create it and mark it as the command's."""
    d = Path(directory)
    check_out_dir(d, command)
    try:
        d.mkdir(parents=True, exist_ok=True)
        write_marker(d, command)
    except OSError as e:
        raise OutDirError(f"cannot write to --out {d}: {e.strerror}; choose another --out") from None
    return d
