"""Run directories that one process owns at a time.

Two runs writing into one directory interleave their metrics and overwrite
each other's checkpoints, and both exit 0. :class:`RunDirLock` takes an
exclusive ``flock`` on ``DIR/.lock`` for as long as a run writes there; a second
run refuses with the holder's pid. The kernel drops the lock when its process
dies, so a lock left by a killed run never blocks the next one: the file stays,
the lock does not.

Taking the lock also removes the temporary files of atomic writes that a kill
left behind (``.NAME.XXXX.tmp``): nobody else can be writing them then.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from pathlib import Path

__all__ = ["RunDirError", "RunDirLock", "RunLockedError", "LOCK_NAME", "remove_stale_tmp"]

LOCK_NAME = ".lock"


class RunDirError(ValueError):
    """A run directory cannot be used as asked: it is a file, in use, or its contents do not fit."""


class RunLockedError(RunDirError):
    """Another live process holds the directory's lock."""


def remove_stale_tmp(directory: Path) -> list[Path]:
    """Delete ``.*.tmp`` leftovers of interrupted atomic writes in ``directory`` and its direct subfolders."""
    removed = []
    folders = [directory] + [p for p in directory.iterdir() if p.is_dir()] if directory.is_dir() else []
    for folder in folders:
        for p in folder.glob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "another process"
    return text or "another process"


class RunDirLock:
    """Exclusive use of a run directory for one ``with`` block (or ``acquire()`` .. ``release()``).

    ``what`` names the command in messages (``polyattn train``). The directory
    is created when missing; ``discard()`` removes it again when this lock made
    it and the run failed before writing anything of its own, so a bad input
    leaves no empty run directory behind.
    """

    def __init__(self, directory: str | os.PathLike, what: str = "a polyattn run", command: str | None = None) -> None:
        self.directory = Path(directory)
        self.what = what
        self.command = command
        self.created = False
        self._made: list[Path] = []  # the lock and marker files this lock added to an existing directory
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_NAME

    def acquire(self) -> RunDirLock:
        d = self.directory
        if self.command is not None:
            from .outdir import check_out_dir

            check_out_dir(d, self.command)  # before anything is created in someone else's folder
        if d.exists() and not d.is_dir():
            raise RunDirError(f"{d} is a file, not a run directory: choose another --out (a folder path)")
        if not d.exists():
            parent = next((p for p in d.parents if p.exists()), None)
            if parent is not None and not parent.is_dir():
                raise RunDirError(f"cannot create run directory {d}: {parent} is a file")
            try:
                d.mkdir(parents=True)
                self.created = True
            except FileExistsError:
                pass  # made by a concurrent run an instant ago: the lock below decides
            except OSError as e:
                raise RunDirError(f"cannot create run directory {d}: {e.strerror}") from None
        had_lock = self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise RunDirError(f"cannot write to run directory {d}: {e.strerror}; choose another --out") from None
        if not had_lock and not self.created:
            self._made.append(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"{d} is in use by {_holder(self.path)}; wait for that run to finish (or stop it), "
                "or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} ({self.what})\n".encode())
        self._fd = fd
        remove_stale_tmp(d)
        if self.command is not None:
            from .outdir import MARKER, write_marker

            if write_marker(d, self.command) and not self.created:
                self._made.append(d / MARKER)
        return self

    def release(self) -> None:
        if self._fd is not None:
            # Empty the holder line first: a reader between unlock and close sees no stale pid.
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Release, and undo this run's traces when it failed before writing anything of its own.

        A directory this lock created goes when it holds nothing but empty folders; in a directory
        that was there before, the lock and marker files this lock added and empty folders go.
        """
        self.release()
        if not self.directory.is_dir() or not (self.created or self._made):
            return
        ours = {LOCK_NAME, ".polyattn"}
        for p in self.directory.rglob("*"):
            if p.is_file() and not (p.parent == self.directory and p.name in ours):
                return
        if self.created:
            shutil.rmtree(self.directory, ignore_errors=True)
            return
        for p in sorted(self.directory.rglob("*"), key=lambda q: len(q.parts), reverse=True):
            if p.is_dir():
                with contextlib.suppress(OSError):
                    p.rmdir()
        for p in self._made:
            p.unlink(missing_ok=True)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            self.discard()
        else:
            self.release()
