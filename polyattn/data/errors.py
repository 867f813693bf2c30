"""Dataset errors that name the path, the expected layout and the fix.

raise DatasetNotFoundError.for_path(root / "wnids.txt", TINY_IMAGENET_LAYOUT)
raise DatasetNotFoundError("plain message")            # also fine
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DatasetError", "DatasetNotFoundError", "DatasetFormatError", "format_layout_message", "root_path"]


def format_layout_message(
    problem: str, path: str | os.PathLike | None, layout: str = "", hint: str | None = None
) -> str:
    """'<problem>: <path>' + the expected layout (indented) + an optional hint line."""
    lines = [problem if path is None else f"{problem}: {os.fspath(path)}"]
    if layout:
        lines.append("expected layout:")
        lines.extend("    " + line for line in layout.strip("\n").splitlines())
    if hint:
        lines.append(hint)
    return "\n".join(lines)


class DatasetError(ValueError):
    """Base class of dataset loading errors; ``path`` and ``layout`` when known."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, layout: str = "") -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
        self.layout = layout

    @classmethod
    def for_path(
        cls,
        path: str | os.PathLike | None,
        layout: str = "",
        hint: str | None = None,
        problem: str | None = None,
    ):
        """An error whose message names ``path``, shows ``layout`` and ends with ``hint``."""
        problem = problem or cls.default_problem
        return cls(format_layout_message(problem, path, layout, hint), path=path, layout=layout)

    default_problem = "dataset error"


class DatasetNotFoundError(DatasetError):
    """A dataset path is missing, or lacks a file or folder its layout needs.

    The message names the path, shows the expected on-disk layout and, where
    polyattn can generate the data, the command that does.
    """

    default_problem = "dataset not found"


class DatasetFormatError(DatasetError):
    """A dataset file exists but does not hold what the layout says (corrupt, wrong keys, bad lines)."""

    default_problem = "malformed dataset file"


def root_path(root, layout: str, dataset: str) -> Path:
    """``data.root`` as a path, or DatasetNotFoundError saying how to set it when it is not set."""
    if root is None or str(root) == "":
        raise DatasetNotFoundError.for_path(
            None,
            layout,
            hint="set the dataset folder with --set data.root=PATH",
            problem=f"data.root is not set (dataset {dataset!r} is read from disk)",
        )
    return Path(os.path.expanduser(str(root)))
