"""The optimizer and its learning-rate schedule: AdamW's parameter groups, warmup + cosine, one-cycle.

``lr_at`` and ``onecycle_at`` are the schedules as plain functions of the update index;
``make_scheduler`` wraps them in a LambdaLR for the trainer. ``apply_optimizer_settings``
puts a resumed run's new lr, weight decay, betas and eps into its restored optimizer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = [
    "param_groups",
    "lr_at",
    "onecycle_at",
    "make_scheduler",
    "set_beta1",
    "apply_optimizer_settings",
]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms, positional embedding and class token are exempt."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup to lr, then cosine to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# torch.optim.lr_scheduler.OneCycleLR's defaults, which the Nystromformer LRA code leaves in place.
ONECYCLE_DIV_FACTOR, ONECYCLE_FINAL_DIV_FACTOR = 25.0, 1e4
ONECYCLE_BASE_MOMENTUM, ONECYCLE_MAX_MOMENTUM = 0.85, 0.95


def onecycle_at(step: int, lr: float, warmup_steps: int, total_steps: int) -> tuple[float, float]:
    """(learning rate, AdamW beta1) of update ``step`` (0-based) under one-cycle with linear annealing.

    The arithmetic of ``torch.optim.lr_scheduler.OneCycleLR(max_lr=lr, total_steps=total_steps,
    pct_start=warmup_steps / total_steps, anneal_strategy="linear")`` with its other defaults: the lr
    rises from lr / 25 to lr over the warmup and falls to lr / 25 / 1e4 at the last update, while
    beta1 (cycle_momentum) falls from 0.95 to 0.85 and rises back. Two cases where OneCycleLR would
    divide by zero or extrapolate are pinned: a phase of one step takes its end value, and steps past
    the last update keep the last update's values.
    """
    initial = lr / ONECYCLE_DIV_FACTOR
    final = initial / ONECYCLE_FINAL_DIV_FACTOR
    step = min(step, total_steps - 1)
    pct_start = warmup_steps / total_steps
    phases = (
        (float(pct_start * total_steps) - 1, initial, lr, ONECYCLE_MAX_MOMENTUM, ONECYCLE_BASE_MOMENTUM),
        (total_steps - 1, lr, final, ONECYCLE_BASE_MOMENTUM, ONECYCLE_MAX_MOMENTUM),
    )
    start = 0.0
    for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            pct = (step - start) / (end - start) if end > start else 1.0
            return (lr1 - lr0) * pct + lr0, (m1 - m0) * pct + m0
        start = end
    raise AssertionError("unreachable: the last phase always matches")


def make_scheduler(
    optimizer, lr: float, min_lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine"
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``lr_at`` (schedule ``cosine``) or ``onecycle_at`` (``onecycle_linear``; beta1 is
    the caller's to set, see ``onecycle_at``)."""

    # A closure, not an object: LambdaLR checkpoints an object's attributes and
    # would restore the old total on a resume that extends train.epochs.
    def factor(step: int) -> float:
        if schedule == "onecycle_linear":
            return onecycle_at(step, lr, warmup_steps, total_steps)[0] / lr
        return lr_at(step, lr, min_lr, warmup_steps, total_steps) / lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_beta1(optimizer: torch.optim.Optimizer, tc: dict, step: int, warmup_steps: int, total_steps: int) -> None:
    """Under onecycle_linear, AdamW's beta1 of update ``step``, as OneCycleLR's cycle_momentum sets it.

    ``tc`` is the config's ``train`` section; other schedules leave beta1 alone.
    """
    if tc["schedule"] != "onecycle_linear":
        return
    beta1 = onecycle_at(step, tc["lr"], warmup_steps, total_steps)[1]
    for g in optimizer.param_groups:
        g["betas"] = (beta1, g["betas"][1])


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, tc: dict
) -> None:
    """Put the config's lr, weight decay, betas and eps into a restored optimizer and its schedule.

    The optimizer's state dict carries the old values; the schedule continues at the current step
    as if the new lr had been the base all along. The groups are those of ``param_groups``.
    """
    groups = optimizer.param_groups
    for i, g in enumerate(groups):
        g["weight_decay"] = tc["weight_decay"] if i == 0 else 0.0  # group 1 is exempt from decay
        g["betas"], g["eps"], g["initial_lr"] = tuple(tc["betas"]), tc["eps"], tc["lr"]
    scheduler.base_lrs = [tc["lr"]] * len(groups)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for g in groups:
        g["lr"] = tc["lr"] * factor
    scheduler._last_lr = [g["lr"] for g in groups]
