"""Long Range Arena (the paper's Table 4): the five tasks with the Nystromformer settings.

    >>> from polyattn.experiments.lra import lra_config, run_lra
    >>> cfg = lra_config("listops", "x^3/14", preset="cpu")
    >>> result = run_lra(cfg, "runs/lra/listops_x3")              # doctest: +SKIP
    >>> result["test_acc"], result["majority_acc"]                # doctest: +SKIP

Settings (mlpen/Nystromformer, LRA/code/lra_config.py and run_tasks.py): the
encoder of polyattn.models.lra; AdamW (betas 0.9/0.999, eps 1e-6, no weight
decay), lr 1e-4 with linear warmup; batch 32 (ListOps, Text, Retrieval) or
256 (Image, Pathfinder); steps and warmup per task (tasks/<task>.yaml).

A protocol (``PROTOCOLS``, protocols/<name>.yaml) sets the choices where the Nystromformer code and
polyattn's defaults part ways, across the model and the trainer:

    nystromformer  model.overrides.protocol=nystromformer (token id 0 is padding,
                   mean over the padded length), train.schedule=onecycle_linear
                   (their OneCycleLR, beta1 cycling included), train.select=best_val
                   (test score of the best validation checkpoint)
    polyattn       the given padding mask and a mean over the valid tokens,
                   warmup + cosine, the final weights

The Table 4 configs use nystromformer, the CPU presets polyattn (``DEFAULT_PROTOCOL``).

The settings are config files of the package (polyattn/experiments/configs/lra/),
read by the config loader and stacked in this order: common.yaml (what every
task shares), protocols/<name>.yaml (``PROTOCOLS``), tasks/<task>.yaml (``TASKS``;
``LraTask.layer`` adds the epochs that cover the steps on the official training
split) and, at reduced scale, cpu/<task>.yaml (``CPU_PRESETS``). The paper's
numbers, the training-split sizes and the default protocols stay here.
``write_lra_configs`` writes the same as two grid files (configs/lra/table4.yaml,
configs/lra/cpu.yaml: task x activation), whose points ``polyattn lra --config
FILE --point listops_x3_div14`` or ``polyattn train`` read back.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..core.activations import get_activation
from ..training.config import (
    apply_overrides,
    dump_config,
    merge_configs,
    read_config_file,
    resolve_config,
    trainer_schema,
)
from ..utils import atomic_write_json, atomic_write_text
from ..utils.format import fmt_pct

__all__ = [
    "PROTOCOLS",
    "DEFAULT_PROTOCOL",
    "lra_protocol",
    "TASKS",
    "TABLE4_ACTIVATIONS",
    "CPU_PRESETS",
    "PAPER_TABLE4",
    "PAPER_DID_NOT_TRAIN",
    "LraTask",
    "lra_config",
    "lra_grid",
    "run_lra",
    "lra_table",
    "is_full_scale",
    "write_lra_configs",
]

# Table 4 of the paper (test accuracy, %), per activation: ListOps, Text, Retrieval, Image, Pathfinder.
PAPER_TABLE4: dict[str, dict[str, float]] = {
    "softmax": {"listops": 37.1, "text": 63.8, "retrieval": 79.8, "image": 39.9, "pathfinder": 72.9},
    "x^3/14": {"listops": 37.5, "text": 63.3, "retrieval": 80.9, "image": 37.2, "pathfinder": 68.7},
    "x/14": {"listops": 34.3, "text": 62.9, "retrieval": 81.5, "image": 39.0, "pathfinder": 69.1},
}
TABLE4_ACTIVATIONS = ("softmax", "x^3/14", "x/14")
# The paper reports that these did not train on LRA (no number in Table 4).
PAPER_DID_NOT_TRAIN = ("x^3", "x")
TASK_ORDER = ("listops", "text", "retrieval", "image", "pathfinder")

# The config layers, stacked in this order: common.yaml, a protocol, the task, the CPU preset (if any).
CONFIG_DIR = Path(__file__).with_name("configs") / "lra"


def _read_layer(path: Path) -> tuple[str, dict]:
    """(description, the settings) of one layer file."""
    layer = read_config_file(path)
    return layer.pop("description", ""), layer


def _layers(folder: str) -> dict[str, dict]:
    return {path.stem: read_config_file(path) for path in sorted((CONFIG_DIR / folder).glob("*.yaml"))}


# What each protocol (protocols/<name>.yaml) sets; user overrides apply on top, so the parts can be mixed deliberately.
PROTOCOLS: dict[str, dict] = _layers("protocols")
# The paper's runs follow the code it took its settings from; the CPU presets keep the protocol their
# documented results (docs/lra.md) were measured with, and reduced-scale runs reproduce no published number.
DEFAULT_PROTOCOL: dict[str | None, str] = {None: "nystromformer", "cpu": "polyattn"}


def _protocol_layer(name: str | None, preset: str | None) -> tuple[str, dict]:
    if preset not in DEFAULT_PROTOCOL:
        raise ValueError(f"unknown preset {preset!r}; presets: cpu")
    name = DEFAULT_PROTOCOL[preset] if name is None else name
    if name not in PROTOCOLS:
        raise ValueError(f"unknown LRA protocol {name!r}; protocols: {', '.join(PROTOCOLS)}")
    return name, copy.deepcopy(PROTOCOLS[name])


def lra_protocol(cfg: dict) -> str:
    """The protocol whose settings a resolved config has, or "custom" when they are mixed."""
    got = {
        "protocol": cfg["model"]["overrides"].get("protocol", "polyattn"),
        "schedule": cfg["train"]["schedule"],
        "select": cfg["train"]["select"],
    }
    for name, layer in PROTOCOLS.items():
        if got == {"protocol": layer["model"]["overrides"]["protocol"], **layer["train"]}:
            return name
    return "custom"


@dataclass(frozen=True)
class LraTask:
    """One LRA task: its config layer (tasks/<name>.yaml: dataset, model, the Nystromformer budget) and
    the facts beside it."""

    name: str
    train_size: int  # size of the official training split (sets the epochs that cover train.max_steps)
    generated: bool = False  # polyattn can generate the data (ListOps, Pathfinder)

    @property
    def path(self) -> Path:
        return CONFIG_DIR / "tasks" / f"{self.name}.yaml"

    @property
    def note(self) -> str:
        """What the task is (its file's description)."""
        return _read_layer(self.path)[0]

    @property
    def dataset(self) -> str:
        return _read_layer(self.path)[1]["data"]["name"]

    def layer(self) -> dict:
        """What this task sets on top of the settings all tasks share (common.yaml), train.epochs included."""
        layer = _read_layer(self.path)[1]
        train = layer["train"]
        steps_per_epoch = math.ceil(self.train_size / train["batch_size"])
        train["epochs"] = math.ceil(train["max_steps"] / steps_per_epoch)
        return layer


TASKS: dict[str, LraTask] = {
    "listops": LraTask("listops", 96000, generated=True),
    "text": LraTask("text", 25000),
    "retrieval": LraTask("retrieval", 147086),
    "image": LraTask("image", 45000),
    "pathfinder": LraTask("pathfinder", 160000, generated=True),
}

# Reduced-scale settings that finish in minutes on a 2-core CPU (generated data only): cpu/<task>.yaml,
# each a layer over its task's.
CPU_PRESETS: dict[str, dict[str, Any]] = _layers("cpu")


def _common() -> dict:
    return read_config_file(CONFIG_DIR / "common.yaml")


def _task(name: str) -> LraTask:
    if name not in TASKS:
        raise ValueError(f"unknown LRA task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def _preset_layer(task: str, preset: str | None) -> dict:
    if preset is None:
        return {}
    if preset != "cpu":
        raise ValueError(f"unknown preset {preset!r}; presets: cpu")
    if task not in CPU_PRESETS:
        raise ValueError(
            f"no CPU preset for {task!r}: the presets exist for tasks whose data polyattn generates "
            f"({', '.join(CPU_PRESETS)}); {task} needs its data set and a GPU-sized budget"
        )
    return {k: v for k, v in CPU_PRESETS[task].items() if k != "description"}


def _grid_description(preset: str | None, protocol: str) -> str:
    if preset is None:
        tasks = "; ".join(f"{t.name}: {t.note}" for t in TASKS.values())
        return f"LRA (Table 4) with the Nystromformer settings, protocol {protocol} ({tasks})"
    notes = "; ".join(f"{name}: {p['description']}" for name, p in CPU_PRESETS.items())
    return f"LRA CPU presets, reduced scale, protocol {protocol} ({notes})"


def _activations(preset: str | None) -> tuple[str, ...]:
    return TABLE4_ACTIVATIONS if preset is None else (*TABLE4_ACTIVATIONS, "x^3/sqrt(N)")


def lra_grid(preset: str | None = None) -> dict:
    """The grid file of the Table 4 runs (``preset=None``) or of the CPU presets: task x activation.

    Every point has the preset's default protocol (``DEFAULT_PROTOCOL``).
    """
    tasks = TASKS if preset is None else {name: TASKS[name] for name in CPU_PRESETS}
    protocol, layer = _protocol_layer(None, preset)
    return {
        "description": _grid_description(preset, protocol),
        "model": layer["model"],
        "train": {**_common()["train"], **layer["train"]},
        "grid": {
            "task": {name: merge_configs(t.layer(), _preset_layer(name, preset)) for name, t in tasks.items()},
            "activation": list(_activations(preset)),
        },
    }


def raw_lra_config(
    task: str, activation: str = "softmax", preset: str | None = None, protocol: str | None = None
) -> dict:
    """The unresolved config of a task (and preset) under ``protocol`` (None: the preset's default).

    With the default protocol it is the point ``<task>_<activation>`` of the preset's grid file.
    """
    t = _task(task)
    act = get_activation(activation)
    protocol, layer = _protocol_layer(protocol, preset)
    cfg = merge_configs(_common(), layer)
    cfg = merge_configs(cfg, t.layer())
    cfg = merge_configs(cfg, _preset_layer(task, preset))
    cfg["model"]["activation"] = act.spec
    cfg["description"] = f"{_grid_description(preset, protocol)} [{task}_{act.slug}]"
    return cfg


def lra_config(
    task: str,
    activation: str = "softmax",
    data: str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    protocol: str | None = None,
) -> dict:
    """Resolved config of an LRA run: the task's settings under ``protocol`` (None: nystromformer at
    full scale, polyattn for the CPU preset), ``data`` as data.root, ``key=value`` overrides last."""
    cfg = raw_lra_config(task, activation, preset, protocol)
    if data is not None:
        cfg["data"]["root"] = str(data)
    return resolve_config(apply_overrides(cfg, overrides))


def _task_of(cfg: dict) -> str:
    for name, t in TASKS.items():
        if t.dataset == cfg["data"]["name"]:
            return name
    raise ValueError(
        f"data.name {cfg['data']['name']!r} is not an LRA dataset ({', '.join(t.dataset for t in TASKS.values())})"
    )


# Keys that do not change what is trained or measured: the free keys of the resume table, and these,
# which change the arithmetic (precision, evaluation batches) but not the setting.
_NEUTRAL_TOO = {"train.amp", "train.eval_batch_size"}


def _neutral(cfg: dict, section: str, key: str) -> bool:
    dotted = f"{section}.{key}"
    return dotted in _NEUTRAL_TOO or trainer_schema().resume_rule(dotted, cfg) == "free"


# Keys a protocol sets: they change what is measured, not the scale of the run.
_PROTOCOL_KEYS = {"data": set(), "train": {"schedule", "select"}}


def _without_protocol(overrides: dict) -> dict:
    return {k: v for k, v in overrides.items() if k != "protocol"}


def is_full_scale(cfg: dict) -> bool:
    """True when the data and training settings are the task's full-scale ones (any activation, seed, protocol)."""
    task = _task_of(cfg)
    full = lra_config(task, cfg["model"]["activation"])
    for section in ("data", "train"):
        for key, value in full[section].items():
            if _neutral(full, section, key) or key in _PROTOCOL_KEYS[section] or key == "seed":
                continue
            if cfg[section].get(key) != value:
                return False
    return cfg["model"]["name"] == full["model"]["name"] and _without_protocol(
        cfg["model"]["overrides"]
    ) == _without_protocol(full["model"]["overrides"])


def run_lra(cfg: dict, out_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> dict:
    """Train with the polyattn trainer and write ``lra_result.json``; returns that result.

    The result: task, activation, protocol, test accuracy (the test split,
    scored with the weights train.select chose; for Text with its default
    validation = test split, the validation accuracy of those weights), the
    majority-class accuracy of that split, the paper's number, and the
    trainer summary.
    """
    from ..training.trainer import train  # imported here: the trainer pulls in the data registry

    task = _task_of(cfg)
    summary = train(cfg, out_dir, resume=resume, progress=progress)
    data_info = summary.get("data") or {}
    test_acc = summary.get("test_acc")
    if test_acc is None and data_info.get("val_is_test"):
        test_acc = summary.get("selected_val_acc")
    activation = cfg["model"]["activation"]
    paper = PAPER_TABLE4.get(activation, {}).get(task)
    steps_asked = cfg["train"]["max_steps"]
    result = {
        "task": task,
        "activation": activation,
        "seed": cfg["train"]["seed"],
        "protocol": lra_protocol(cfg),
        "test_acc": test_acc,
        "test_acc_last": summary.get("test_acc_last"),
        "selected_epoch": summary.get("selected_epoch"),
        "best_val_acc": summary.get("best_val_acc"),
        "majority_acc": data_info.get("majority_test_acc"),
        "paper_test_acc": None if paper is None else paper / 100,
        "diverged": summary.get("diverged", False),
        "steps": summary.get("steps"),
        "steps_short": bool(steps_asked and summary.get("steps", 0) < steps_asked and not summary.get("diverged")),
        "reduced_scale": not is_full_scale(cfg),
        "time_s": summary.get("time_s"),
        "device": summary.get("device"),
        "run_dir": str(out_dir),
        "data": data_info,
    }
    if Path(out_dir).is_dir() and os.environ.get("RANK", "0") == "0":
        atomic_write_json(result, Path(out_dir) / "lra_result.json")
    return result


def _pct1(v: float | None) -> str:
    return fmt_pct(v, 1, sign=False)


def _paper(r: dict) -> str:
    return "did not train" if r["activation"] in PAPER_DID_NOT_TRAIN else _pct1(r["paper_test_acc"])


def _protocol_of(r: dict) -> str:
    # Results written before protocols existed trained under what is now called polyattn.
    return r.get("protocol", "polyattn")


def _setting(run_dir: Path) -> str:
    """What a run trained, less its seed and activation: runs that agree here are seeds of one setting."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return str(run_dir)
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    cfg.pop("description", None)
    cfg.get("model", {}).pop("activation", None)
    cfg.get("train", {}).pop("seed", None)
    for section in ("data", "train"):
        for key in [k for k in cfg.get(section, {}) if _neutral(cfg, section, k)]:
            cfg[section].pop(key)
    return json.dumps(cfg, sort_keys=True, default=str)


def lra_table(run_dirs: Sequence[str | os.PathLike]) -> str:
    """Markdown table of finished runs (lra_result.json), with the paper's Table 4 beside them.

    Where several runs differ only in their seed, a second table gives the mean
    and sample standard deviation of their test accuracy (diverged runs are
    counted, not averaged).
    """
    rows = []
    for d in run_dirs:
        path = Path(d) / "lra_result.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {d} a finished `polyattn lra` run?")
        rows.append({**json.loads(path.read_text()), "_setting": _setting(Path(d))})
    rows.sort(key=lambda r: (TASK_ORDER.index(r["task"]), r["activation"], r.get("seed", 0)))
    lines = [
        "| task | activation | seed | test acc (%) | majority (%) | paper Table 4 (%) | steps | scale | time (s) "
        "| protocol |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = "diverged" if r["diverged"] else _pct1(r["test_acc"])
        scale = "reduced (CPU preset)" if r["reduced_scale"] else "full"
        time_s = "-" if r.get("time_s") is None else f"{r['time_s']:.0f}"
        lines.append(
            f"| {r['task']} | {r['activation']} | {r.get('seed', '-')} | {acc} | {_pct1(r['majority_acc'])} | "
            f"{_paper(r)} | {r['steps']} | {scale} | {time_s} | {_protocol_of(r)} |"
        )
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["activation"], r["_setting"]), []).append(r)
    if all(len(g) < 2 for g in groups.values()):
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "| task | activation | runs | diverged | test acc, mean ± std (%) | paper Table 4 (%) | scale | protocol |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (task, activation, _), g in groups.items():
        accs = [100 * r["test_acc"] for r in g if not r["diverged"] and r["test_acc"] is not None]
        if not accs:
            cell = "-"
        elif len(accs) == 1:
            cell = f"{accs[0]:.1f}"
        else:
            cell = f"{statistics.fmean(accs):.1f} ± {statistics.stdev(accs):.1f}"
        scale = "reduced (CPU preset)" if g[0]["reduced_scale"] else "full"
        lines.append(
            f"| {task} | {activation} | {len(g)} | {sum(bool(r['diverged']) for r in g)} | {cell} | "
            f"{_paper(g[0])} | {scale} | {_protocol_of(g[0])} |"
        )
    return "\n".join(lines) + "\n"


def write_lra_configs(out_dir: str | os.PathLike) -> list[Path]:
    """Write configs/lra/: table4.yaml (task x activation at full scale) and cpu.yaml (the CPU presets)."""
    out = Path(out_dir)
    written = [out / "table4.yaml", out / "cpu.yaml"]
    for path, preset in zip(written, (None, "cpu"), strict=True):
        atomic_write_text(dump_config(lra_grid(preset)), path)
    return written
