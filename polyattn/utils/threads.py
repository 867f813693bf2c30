"""``torch_threads(n)``: intra-op threads for one run, restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``n`` intra-op threads (None or 0: leave torch's setting), then restore it.

    A setting such as ``train.num_threads`` belongs to one run: a grid worker, a test or a
    notebook that calls several runs in one process must get its own setting back. Yields the
    thread count in use inside the block, which is what a run record names.
    """
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
