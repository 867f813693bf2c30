"""Atomic writes: a file is either the old version or the complete new one, never half written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_checkpoint",
    "read_jsonl",
    "read_yaml_mapping",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_replace(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name starts with "." and ends with ".tmp": RunDirLock removes such leftovers of a kill.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; the finished file gets the mode open() would give it under the umask.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = _os_error_behind(e)
        if cause is not None and cause is not e:
            # torch.save reports a full disk as a RuntimeError of its zip writer, raised while handling
            # the OSError that says what happened: the OSError is the error to report.
            raise OSError(cause.errno, cause.strerror, str(path)) from None
        raise


def _os_error_behind(e: BaseException) -> OSError | None:
    """The first OSError with an errno in ``e``'s chain of causes and contexts (``e`` itself included)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def load_checkpoint(
    path: str | os.PathLike, needed: tuple[str, ...] = (), fix: str = "", map_location: Any = "cpu"
) -> dict:
    """torch.load of a checkpoint dict; RunDirError naming the file (and ``fix``) when it is missing,
    truncated, not a checkpoint, or lacks one of the ``needed`` keys."""
    from .rundir import RunDirError

    p = Path(path)
    tail = f"; {fix}" if fix else ""
    if not p.is_file():
        raise RunDirError(f"{p} not found{tail}")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file raises any of several types
        raise RunDirError(
            f"{p} is unreadable, truncated or not a polyattn checkpoint ({type(e).__name__}: {str(e)[:200]}){tail}"
        ) from None
    missing = [k for k in needed if not isinstance(ckpt, dict) or k not in ckpt]
    if not isinstance(ckpt, dict) or missing:
        raise RunDirError(f"{p} is not a polyattn checkpoint of this kind (it lacks {missing}){tail}")
    return ckpt


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary file in the same directory and a rename."""
    _atomic_replace(Path(path), lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    _atomic_replace(Path(path), lambda f: f.write(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    _atomic_replace(Path(path), lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> None:
    atomic_write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n", path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All JSON objects of a .jsonl file; a truncated last line (a killed writer) is skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict:
    """The mapping a YAML file holds ({} for an empty file); ValueError naming the file for anything else.

    A missing file, bytes that are not UTF-8, invalid YAML and a top level that is not a mapping each
    get their own message.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        state = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise ValueError(f"{what} not found: {p} {state}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{what} {p} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark and problem else str(e)
        raise ValueError(f"{what} {p} is not valid YAML ({where})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} {p}: expected a YAML mapping of keys, got {type(data).__name__}")
    return data
