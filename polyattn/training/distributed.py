"""Process-group setup for ``torchrun``: DDP with gloo on CPU and nccl on GPU.

``torchrun --nproc_per_node=N -m polyattn train ...`` sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain ``polyattn train`` runs as a
single process (world size 1) without a process group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..utils import seed_everything
from ..utils.threads import torch_threads

T = TypeVar("T")

__all__ = [
    "DistEnv",
    "init_distributed",
    "cleanup_distributed",
    "all_reduce_sum",
    "broadcast_object",
    "gather_objects",
    "on_main",
    "distributed_run",
    "wrap_ddp",
    "seed_rank",
    "RANK_SEED_STRIDE",
]


@dataclass
class DistEnv:
    """Where this process sits: rank, world size, local rank, backend and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when init_distributed created the process group

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        from .config import ConfigError  # a user's setting, reported as one (exit 2), not as a crash

        raise ConfigError(
            "train.device=cuda but torch sees no CUDA device here (torch.cuda.is_available() is False); "
            "use train.device=auto or cpu, or install a CUDA build of torch on a machine with a GPU"
        )
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join the process group torchrun describes in the environment (if any) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device_preference, local_rank)
    if world_size <= 1:
        return DistEnv(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():  # set up by the caller: use it as it is
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, local_rank, backend, device, owns_group=True)


def cleanup_distributed(env: DistEnv) -> None:
    """Leave the process group if ``init_distributed`` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``t`` over processes (in place) and return it; identity for one process."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every process's ``obj``, in rank order (on every process)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def on_main(work: Callable[[], T], env: DistEnv) -> T | None:
    """``work()`` on rank 0 (None elsewhere), after which every rank raises rank 0's error if it had one.

    For what one process must do alone (lock the run directory, write generated data): the other
    ranks wait here, and an error stops every rank instead of leaving them waiting in a collective.
    """
    result, error = None, None
    if env.is_main:
        try:
            result = work()
        except Exception as e:  # handed to every rank below, then raised
            error = e
    error = broadcast_object(error, env)
    if error is not None:
        raise error
    return result


@contextmanager
def distributed_run(device_preference: str, num_threads: int | None) -> Iterator[DistEnv]:
    """One run's process: joined to torchrun's group (if any) with ``num_threads`` intra-op threads.

    The threads are restored and the group left afterwards, so that a grid worker or a notebook
    running several runs in one process gets its own settings back.
    """
    env = init_distributed(device_preference)
    try:
        with torch_threads(num_threads):
            yield env
    finally:
        cleanup_distributed(env)


def wrap_ddp(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """``model`` in DistributedDataParallel under torchrun (on this rank's GPU, or on CPU), else itself."""
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


# A prime: the streams of ranks 1, 2, ... stay apart from those of nearby seeds.
RANK_SEED_STRIDE = 7919


def seed_rank(seed: int, env: DistEnv) -> None:
    """Own random streams (dropout, augmentation, sampling) for every rank but 0, which keeps ``seed``'s.

    Called after the model is built, so that every process starts from the same weights.
    """
    if env.rank > 0:
        seed_everything(seed + RANK_SEED_STRIDE * env.rank)
