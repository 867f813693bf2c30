"""Small shared helpers: atomic file writes, seeding, plotting setup."""

from .io import atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl
from .rundir import RunDirError, RunDirLock, RunLockedError
from .seed import seed_everything

__all__ = [
    "RunDirError",
    "RunDirLock",
    "RunLockedError",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "read_jsonl",
    "seed_everything",
]
