"""Small shared helpers: atomic file writes, seeding, run-directory locks, the name registry."""

from .io import atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl
from .outdir import OutDirError, prepare_out_dir
from .registry import Entry, Registry
from .rundir import RunDirError, RunDirLock, RunLockedError
from .seed import seed_everything

__all__ = [
    "Entry",
    "OutDirError",
    "Registry",
    "RunDirError",
    "RunDirLock",
    "RunLockedError",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "prepare_out_dir",
    "read_jsonl",
    "seed_everything",
]
