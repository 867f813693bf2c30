"""Checkpoints and resume rules shared by every training loop (the trainer, the PINN and detection loops).

A resume reads ``RUN/checkpoints/last.pt`` and compares the config stored in it (what actually
ran) with the config asked for now: each changed key is taken silently, applied from the current
step on, or refused, by the resume rule its schema declares (``Key.resume``: free, applied, fixed).
Missing, truncated and foreign checkpoints, and refused changes, raise
:class:`~polyattn.utils.rundir.RunDirError` naming the file or the keys and the fix.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.io import load_checkpoint
from ..utils.rundir import RunDirError
from .config import RESUMABLE, ConfigError, ConfigSchema, Key
from .distributed import DistEnv, gather_objects

__all__ = [
    "CHECKPOINT",
    "config_changes",
    "divergence_advice",
    "gather_rng_states",
    "read_checkpoint",
    "refuse_changes",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT = Path("checkpoints") / "last.pt"


def read_checkpoint(run_dir: Path, needed: Sequence[str], command: str = "polyattn train") -> dict:
    """The checkpoint of ``run_dir`` for a resume, or a RunDirError saying what is wrong and what to do."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise RunDirError(
            f"cannot resume {run_dir}: {path} not found (the run stopped before its first checkpoint, or the "
            f"file was removed); start the run again without --resume, or train into a new --out"
        )
    return load_checkpoint(
        path,
        tuple(needed),
        f"cannot resume {run_dir}: delete {path.parent} to start this run again from step 0 "
        f"({command} without --resume), or train into a new --out",
    )


def rng_state(device: torch.device) -> dict:
    """Every random stream a training step draws from (python, numpy, torch, and CUDA's on a GPU)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` saved, so that a resumed run draws what the uninterrupted one would."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(env: DistEnv) -> list[dict]:
    """Every process's :func:`rng_state`, in rank order, for the checkpoint (a collective: every rank calls it)."""
    return gather_objects(rng_state(env.device), env)


def _flat(d: dict, keys: dict[str, Key], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        # A mapping the schema declares as one key (model.overrides, pde.params) changes as one.
        if isinstance(v, dict) and v and f"{prefix}{k}" not in keys:
            out.update(_flat(v, keys, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _keys_of(schema: ConfigSchema, cfg: dict) -> dict[str, Key]:
    try:
        return schema.keys(cfg)
    except ConfigError:  # a dataset unknown here: its keys compare one by one, and are refused
        return {}


def config_changes(
    old: dict, new: dict, schema: ConfigSchema, allowed: Sequence[str] = RESUMABLE
) -> tuple[dict[str, list], dict[str, list]]:
    """(changes to apply and record, changes to refuse) from the config ``old`` to ``new``.

    Each maps a dotted key to ``[old, new]``. A key's resume rule (``schema.resume_rule``) decides:
    a rule not in ``allowed`` refuses the change; an allowed "applied" key is returned to be applied
    and recorded; an allowed "free" key changes no number and is left out. A resume allows free and
    applied keys; reusing a finished run (a grid's ``--resume``) allows free keys only.
    """
    keys = {**_keys_of(schema, old), **_keys_of(schema, new)}
    a, b = _flat(old, keys), _flat(new, keys)
    applied, refused = {}, {}
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        rule = schema.resume_rule(key, new)
        if rule not in allowed:
            refused[key] = [a.get(key), b.get(key)]
        elif rule == "applied":
            applied[key] = [a.get(key), b.get(key)]
    return applied, refused


def refuse_changes(run_dir: Path, refused: dict[str, list]) -> None:
    """Raise the RunDirError that lists the refused changes and how to proceed (no-op when there are none)."""
    if not refused:
        return
    listed = "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
    if "train.amp" in refused:
        listed += (
            f"\n  (train.amp=auto resolves by what this machine computes natively; to continue as the run "
            f"began, pass --set train.amp={refused['train.amp'][0]})"
        )
    raise RunDirError(
        f"cannot resume {run_dir}: the config differs from the one its checkpoint was trained with in keys "
        f"a resume cannot change:\n  {listed}\n"
        f"undo these changes (--set, or restore {run_dir / 'config.yaml'}), or start a new run with another --out"
    )


def divergence_advice(activation: str | None) -> str:
    """What to try first about the attention activation after a non-finite loss ("" when nothing)."""
    if activation is None or activation == "softmax":
        return ""
    if "/" in activation:
        return "a larger divisor in the activation, "
    return "a scaled activation (e.g. x^3/sqrt(N) or x^3/16: unscaled powers grow with the sequence length), "
