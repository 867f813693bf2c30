"""The data side of a run: samplers and loaders, a batch on the device and through the model, evaluation.

The training loader's order depends only on (seed, epoch) for any number of processes, which makes
a resume exact and N processes see the batches one process would; evaluation deals each example
to exactly one process and sums the results over all of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .distributed import DistEnv, all_reduce_sum

__all__ = [
    "ShardSampler",
    "train_loader",
    "eval_loader",
    "to_device",
    "model_forward",
    "scored_count",
    "flatten_tokens",
    "evaluate",
]


def _seed_numpy_in_worker(worker_id: int) -> None:
    # torch seeds python's random and its own RNG in each DataLoader worker, not numpy's (which
    # timm's RandAugment draws from): without this, workers would share one numpy stream.
    np.random.seed(torch.initial_seed() % 2**32)


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ...: every example evaluated exactly once across processes."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(ds: Dataset, batch: int, seed: int, env: DistEnv, workers: int) -> DataLoader:
    # DistributedSampler also for one process: its order depends only on
    # (seed, epoch), which makes resume exact, and N processes see exactly the
    # batches one process would (interleaved), which makes DDP match it.
    sampler = DistributedSampler(ds, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=_seed_numpy_in_worker if workers > 0 else None,
    )


def eval_loader(ds: Dataset, batch: int, env: DistEnv, workers: int) -> DataLoader:
    sampler = ShardSampler(len(ds), env.rank, env.world_size)
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=env.device.type == "cuda")


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, dict):
        return {k: v.to(device, non_blocking=True) for k, v in x.items()}
    return x.to(device, non_blocking=True)


def model_forward(model: nn.Module, x: Any) -> torch.Tensor:
    return model(**x) if isinstance(x, dict) else model(x)


def scored_count(y: torch.Tensor) -> int:
    """Scored targets in a batch: one per example for class labels, the answers (label != -100) for tokens."""
    return int((y != -100).sum())


def flatten_tokens(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level logits (B, T, C) and targets (B, T) as (B*T, C) and (B*T,); cross_entropy skips -100."""
    if logits.dim() == 3 and y.dim() == 2:
        return logits.flatten(0, 1), y.flatten()
    return logits, y


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: DistEnv, dtype: torch.dtype | None) -> dict:
    """Mean cross-entropy and accuracy over the whole split (summed across processes)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)
    for x, y in loader:
        x, y = to_device(x, env.device), y.to(env.device, non_blocking=True)
        with torch.autocast(env.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model_forward(model, x)
        logits, y = flatten_tokens(logits.float(), y)
        sums += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum").double(),
                (logits.argmax(-1) == y).sum().double(),
                torch.tensor(float(scored_count(y)), dtype=torch.float64, device=env.device),
            ]
        )
    all_reduce_sum(sums, env)
    model.train(was_training)
    loss, correct, n = sums.tolist()
    return {"loss": loss / max(n, 1), "acc": correct / max(n, 1), "n": int(n)}
