"""Atomic writes: a file is either the old version or the complete new one, never half written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "atomic_write_json", "atomic_write_text", "read_jsonl"]


def _atomic_replace(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary file in the same directory and a rename."""
    _atomic_replace(Path(path), lambda f: torch.save(obj, f))


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
