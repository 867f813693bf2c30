"""Training configs: nested dicts with dotted keys, defaults, inheritance and validation.

    cfg = load_config("configs/digits_vit_micro.yaml", ["train.epochs=5", "model.activation=x^3/sqrt(N)"])

A config file is YAML with the sections ``model``, ``data``, ``train`` and
``diagnostics`` (plus sections other modules register with
``register_config_section``), an optional free-text ``description`` and an
optional ``inherit: other.yaml`` (or a list): the inherited files are merged
first, in order, then this file on top (nested dicts merge key by key).
Overrides ``a.b=value`` parse ``value`` as YAML and apply last. Every key is
documented in docs/training.md; an unknown key or a bad value raises
``ConfigError`` naming the key and what is allowed.

Every kind of config declares its keys the same way: a :class:`Key` (type, default, choices,
range check, resume rule) per key, gathered in a :class:`ConfigSchema` (the trainer's is
:func:`trainer_schema`; PINN_CONFIG and DETECT_CONFIG in experiments/), or, for the flat bench
and theory settings, in dataclass fields declared with :func:`setting`. A key's resume rule
(RESUME_RULES: free, applied, fixed) is the one table every resume reads
(``checkpoint.config_changes``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.activations import get_activation
from ..data.errors import DatasetError
from ..data.registry import (
    COMMON_DATA_KEYS,
    check_data_values,
    dataset_defaults,
    dataset_resume_rules,
    list_datasets,
)
from ..models.registry import TIMM_PREFIX, is_known_model, list_models
from ..utils.io import read_yaml_mapping

__all__ = [
    "GRID_KEY",
    "RESUMABLE",
    "RESUME_RULES",
    "REUSABLE",
    "ConfigError",
    "ConfigSchema",
    "Key",
    "apply_overrides",
    "at_least",
    "canonical_activation",
    "check_amp_device",
    "check_settings",
    "default_config",
    "dump_config",
    "get_key",
    "grid_points",
    "int_setting",
    "ints_at_least",
    "is_grid_file",
    "greater_than",
    "list_of",
    "load_config",
    "merge_configs",
    "non_negative",
    "parse_override",
    "positive_int",
    "read_config_file",
    "register_config_section",
    "resolve_config",
    "resume_table",
    "setting",
    "settings_from_dict",
    "specs_setting",
    "subset_of",
    "trainer_schema",
]

META_KEYS = ("inherit", "description")
GRID_KEY = "grid"


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the key and the fix."""


# What a resume may do with a changed key. Every key of a run's schema (trainer, PINN, detection)
# declares one; docs/training.md's table is printed from them (resume_table).
RESUME_RULES: dict[str, str] = {
    "free": "changes no number of the run: a resume takes the new value silently, and a finished run is "
    "reused whatever its value",
    "applied": "changes the steps still to come: a resume applies it from its first step on (the trainer "
    "records the change as a `resume` row); a finished run with another value is not reused",
    "fixed": "belongs to the steps already taken: a resume refuses a change",
}
# What a resume of a run may change; a finished run is reused by a grid only when it differs in free keys.
RESUMABLE = ("free", "applied")
REUSABLE = ("free",)


@dataclass(frozen=True)
class Key:
    """Schema of one config key: its default, the values it accepts and what a resume may do with it.

    ``resume`` is one of RESUME_RULES; keys of settings that never resume (bench, theory) leave it None.
    """

    default: Any
    kind: str  # "int", "float", "bool", "str", "list", "dict", "any"
    nullable: bool = False
    choices: tuple | None = None
    check: Callable[[Any], bool] | None = None
    requirement: str = ""  # words for the error message, e.g. ">= 1"
    resume: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.resume is not None and self.resume not in RESUME_RULES:
            raise ValueError(f"Key.resume must be one of {list(RESUME_RULES)}, got {self.resume!r}")


def at_least(lo: float) -> Callable[[Any], bool]:
    return lambda v: v >= lo


def greater_than(lo: float) -> Callable[[Any], bool]:
    return lambda v: v > lo


def positive_int(default: int | None, resume: str | None = None, nullable: bool = False) -> Key:
    """An int key that must be >= 1."""
    return Key(default, "int", nullable, check=at_least(1), requirement=">= 1", resume=resume)


def non_negative(default: float, resume: str | None = None, requirement: str = ">= 0") -> Key:
    """A float key that must be >= 0."""
    return Key(default, "float", check=at_least(0), requirement=requirement, resume=resume)


# The trainer's sections besides ``data`` (whose keys each dataset declares: data/registry.py).
# Resume rules: model keys built the weights and data keys drew the batches, so both are fixed; in
# train, what orders or batches the data (batch_size, seed), the numerics of the steps taken (amp) and
# which weights the run reports (select: best_val must have seen every evaluation) are fixed.
_BUILTIN: dict[str, dict[str, Key]] = {
    "model": {
        "name": Key("vit_micro", "str", resume="fixed"),
        "activation": Key("softmax", "str", resume="fixed"),
        "overrides": Key({}, "dict", resume="fixed"),
        "init_from": Key(None, "str", nullable=True, resume="fixed"),
    },
    "train": {
        "epochs": positive_int(10, "applied"),
        "batch_size": positive_int(64, "fixed"),
        "eval_batch_size": positive_int(None, "applied", nullable=True),
        "lr": Key(1e-3, "float", check=greater_than(0), requirement="> 0", resume="applied"),
        "min_lr": non_negative(0.0, "applied"),
        "weight_decay": non_negative(0.05, "applied"),
        "betas": Key(
            [0.9, 0.999],
            "list",
            check=lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v),
            requirement="two numbers in [0, 1)",
            resume="applied",
        ),
        "eps": Key(1e-8, "float", check=greater_than(0), requirement="> 0", resume="applied"),
        "warmup_epochs": non_negative(1.0, "applied"),
        "warmup_steps": Key(None, "int", nullable=True, check=at_least(0), requirement=">= 0", resume="applied"),
        "label_smoothing": Key(0.1, "float", check=lambda v: 0 <= v < 1, requirement="in [0, 1)", resume="applied"),
        "grad_clip": non_negative(1.0, "applied", ">= 0 (0 = off)"),
        "mixup": non_negative(0.0, "applied", ">= 0 (0 = off)"),
        "cutmix": non_negative(0.0, "applied", ">= 0 (0 = off)"),
        # Which Mixup/CutMix: polyattn's mix_batch (torch RNG) or timm.data.Mixup (numpy RNG; pip install
        # polyattn[timm]); both checkpointed, so either resumes exactly.
        "mixup_impl": Key("polyattn", "str", choices=("polyattn", "timm"), resume="applied"),
        # EMA of the weights (timm.utils.ModelEmaV3), updated after every optimizer step; 0 = off.
        "ema_decay": Key(0.0, "float", check=lambda v: 0 <= v < 1, requirement="in [0, 1) (0 = off)", resume="applied"),
        "seed": Key(0, "int", check=at_least(0), requirement=">= 0", resume="fixed"),
        "amp": Key("auto", "str", choices=("auto", "off", "bf16", "fp16"), resume="fixed"),
        "device": Key("auto", "str", choices=("auto", "cpu", "cuda"), resume="free"),
        "max_steps": positive_int(None, "applied", nullable=True),
        "schedule": Key("cosine", "str", choices=("cosine", "onecycle_linear"), resume="applied"),
        "select": Key("last", "str", choices=("last", "best_val"), resume="fixed"),
        "eval_every": positive_int(1, "applied"),
        "log_every": positive_int(10, "free"),
        "num_threads": positive_int(None, "free", nullable=True),
    },
    "diagnostics": {
        # The norms rows are part of what a run measures (the comparison's report reads them).
        "every": Key(0, "int", check=at_least(0), requirement=">= 0 (0 = off)", resume="applied"),
    },
}

# Sections added by other modules (register_config_section): name -> keys.
_EXTRA: dict[str, dict[str, Key]] = {}


def _key_from_default(value: Any, resume: str | None = None) -> Key:
    if value is None:
        return Key(None, "any", nullable=True, resume=resume)
    for kind, types in (
        ("bool", bool),
        ("int", int),
        ("float", float),
        ("str", str),
        ("list", list),
        ("dict", dict),
    ):
        if isinstance(value, types):
            return Key(copy.deepcopy(value), kind, resume=resume)
    return Key(copy.deepcopy(value), "any", resume=resume)


def register_config_section(name: str, defaults: dict, resume: str = "applied") -> None:
    """Add a config section (or new keys to one) with the given defaults.

    A key's type is taken from its default (``None``: any value); ``resume`` is the keys' resume rule
    (one of RESUME_RULES: by default a resume applies and records a change). Registering
    the same key again with the same default is a no-op; with another default
    it is an error, as is touching the ``data`` section (datasets declare their
    keys with ``register_dataset(name, defaults=...)``).
    """
    if name in META_KEYS or name == "data":
        raise ValueError(f"cannot register config section {name!r}")
    section = _EXTRA.setdefault(name, {})
    builtin = _BUILTIN.get(name, {})
    for key, value in defaults.items():
        old = builtin.get(key) or section.get(key)
        if old is not None:
            if old.default != value:
                raise ValueError(f"config key {name}.{key} is already registered with default {old.default!r}")
            continue
        section[key] = _key_from_default(value, resume)


class _DataKeys:
    """The trainer's ``data`` section: the keys of the dataset it names (the default dataset when none).

    Their choices and range checks are the dataset's own, tested by ``check_data_values``.
    """

    def __call__(self, given: dict) -> dict[str, Key]:
        name = given.get("name", COMMON_DATA_KEYS["name"])
        if not isinstance(name, str):
            raise ConfigError(f"data.name must be a string, got {name!r}")
        if name not in list_datasets():
            raise ConfigError(f"data.name: unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
        rules = dataset_resume_rules(name)
        keys = {k: _key_from_default(v, rules[k]) for k, v in dataset_defaults(name).items()}
        keys["root"] = Key(None, "str", nullable=True, resume=rules["root"])
        return keys

    @staticmethod
    def by_rule() -> dict[str, list[str]]:
        """Rule -> the section's keys under it, for the docs: the common keys, then each dataset's own."""
        rules = dataset_resume_rules(COMMON_DATA_KEYS["name"])
        out = {rule: [f"`{k}`" for k in COMMON_DATA_KEYS if rules[k] == rule] for rule in RESUME_RULES}
        for dataset in list_datasets():
            for key, rule in dataset_resume_rules(dataset).items():
                if key not in COMMON_DATA_KEYS and rule != "fixed":
                    out[rule].append(f"`{key}` ({dataset})")
        out["fixed"].append("every other key of a dataset")
        return out


_data_keys = _DataKeys()


def trainer_schema() -> ConfigSchema:
    """The schema of ``polyattn train`` configs: the built-in sections, ``data`` by the dataset it
    names, then the sections other modules registered (sorted)."""
    sections: dict[str, dict[str, Key] | Callable[[dict], dict[str, Key]]] = {
        "model": _BUILTIN["model"],
        "data": _data_keys,
    }
    for name in ["train", "diagnostics", *sorted(set(_EXTRA) - set(_BUILTIN))]:
        sections[name] = {**_BUILTIN.get(name, {}), **_EXTRA.get(name, {})}
    return ConfigSchema(kind="config", sections=sections, check=_check_semantics)


def _sections() -> list[str]:
    return list(trainer_schema().sections)


# --- reading and merging ----------------------------------------------------
def _read_yaml(path: Path) -> dict:
    try:
        return read_yaml_mapping(path, "config file")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _merge(base: dict, layer: dict, where: str = "") -> dict:
    """Deep merge ``layer`` into a copy of ``base``.

    A change of data.name drops the keys the new dataset does not accept.
    """
    out = copy.deepcopy(base)
    for key, value in layer.items():
        path = f"{where}{key}"
        if path == "data" and isinstance(value, dict) and isinstance(out.get("data"), dict):
            out["data"] = _merge_data(out["data"], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, path + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_configs(base: dict, layer: dict) -> dict:
    """``layer`` merged into a copy of ``base`` (nested mappings key by key), as inherit and --set merge."""
    return _merge(base, layer)


def _merge_data(base: dict, layer: dict) -> dict:
    new_name = layer.get("name")
    if new_name is not None and new_name != base.get("name"):
        if not isinstance(new_name, str):
            raise ConfigError(f"data.name must be a string, got {new_name!r}")
        accepted = set(_data_keys({"name": new_name}))
        base = {k: v for k, v in base.items() if k in accepted}
    return _merge(base, layer, "data.")


def _load_file(path: Path, stack: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"inherit cycle: {chain}")
    raw = _read_yaml(path)
    return _merge(_inherited(path, raw.pop("inherit", None), (*stack, path)), raw)


def _inherited(path: Path, parents: Any, stack: tuple[Path, ...]) -> dict:
    """The merged files an ``inherit`` entry of the file ``path`` names (paths relative to that file)."""
    if parents is None:
        parents = []
    elif isinstance(parents, str):
        parents = [parents]
    elif not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise ConfigError(f"{path}: 'inherit' must be a file path or a list of paths, got {parents!r}")
    merged: dict = {}
    for parent in parents:
        parent_path = Path(os.path.expanduser(parent))
        if not parent_path.is_absolute():
            parent_path = path.parent / parent_path
        if not parent_path.is_file():
            raise ConfigError(f"{path}: inherited config file not found: {parent_path}")
        layer = _load_file(parent_path, stack)
        if GRID_KEY in layer:
            raise ConfigError(f"{path}: cannot inherit {parent_path}, a grid of runs; inherit one of its bases")
        merged = _merge(merged, layer)
        merged.pop("description", None)  # a description belongs to the file that states it
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a', 'b', 'c'], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.epochs=5")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket): keep the text and let validation judge it
    return parts, value


def _apply_override(cfg: dict, parts: list[str], value: Any) -> dict:
    layer: Any = value
    for p in reversed(parts):
        layer = {p: layer}
    if len(parts) == 1 and isinstance(value, dict):
        cfg = dict(cfg)  # a whole section given as a mapping replaces that section
        cfg[parts[0]] = copy.deepcopy(value)
        return cfg
    if len(parts) == 2 and isinstance(value, dict) and isinstance(cfg.get(parts[0]), dict):
        cfg = copy.deepcopy(cfg)  # key=mapping replaces the mapping, it does not merge into it
        cfg[parts[0]][parts[1]] = copy.deepcopy(value)
        return cfg
    return _merge(cfg, layer)


# --- validation ---------------------------------------------------------------
def _unknown(key: str, allowed: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], [a.split(".")[-1] for a in allowed], n=1)
    hint = f" (did you mean {where}{close[0]}?)" if close else ""
    return ConfigError(f"unknown config key {where}{key}{hint}; allowed keys: {', '.join(where + a for a in allowed)}")


def _coerce(full_key: str, spec: Key, value: Any) -> Any:
    if value is None:
        if spec.nullable or spec.kind == "any":
            return None
        raise ConfigError(f"{full_key} must not be null")
    kind = spec.kind
    bad = None
    if kind == "float":
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                bad = "a number"
        if bad is None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            bad = "a number"
        elif bad is None:
            value = float(value)
            if not math.isfinite(value):
                bad = "a finite number"
    elif kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            bad = "an integer"
    elif kind == "bool":
        if not isinstance(value, bool):
            bad = "true or false"
    elif kind == "str":
        if isinstance(value, bool) and spec.choices is not None and "off" in spec.choices:
            value = "off" if value is False else value  # YAML 1.1 reads a bare `off` as false
        if isinstance(value, (int, float)) and not isinstance(value, bool) and spec.choices is None:
            value = str(value)
        if not isinstance(value, str):
            bad = "a string"
    elif kind == "list":
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            bad = "a list"
    elif kind == "dict" and not isinstance(value, dict):
        bad = "a mapping"
    if bad:
        if spec.requirement.startswith(("a ", "an ")):  # "a positive integer" says the type too
            bad = spec.requirement
        raise ConfigError(f"{full_key} must be {bad}, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"{full_key} must be one of {list(spec.choices)}, got {value!r}")
    if spec.check is not None:
        try:
            ok = spec.check(value)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{full_key} must be {spec.requirement}, got {value!r}")
    return value


def _resolve_section(name: str, schema: dict[str, Key], given: Any) -> dict:
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError(f"config section {name!r} must be a mapping of keys, got {given!r}")
    for key in given:
        if key not in schema:
            raise _unknown(str(key), sorted(schema), name + ".")
    out = {}
    for key, spec in schema.items():
        value = given[key] if key in given else copy.deepcopy(spec.default)
        out[key] = _coerce(f"{name}.{key}", spec, value)
    return out


def resolve_config(cfg: dict | None = None) -> dict:
    """Fill defaults into a (partial) nested config and validate it; returns a new dict.

    Raises ConfigError for unknown sections or keys and for bad values:
    activation specs are checked with ``polyattn.get_activation``, model and
    dataset names against their registries.
    """
    # Importing the registries' provider modules may register config sections too.
    list_datasets()
    list_models()
    return trainer_schema().resolve(cfg)


def canonical_activation(model: dict) -> None:
    """Set ``model["activation"]`` to its canonical spec, or raise ConfigError naming model.activation.

    Every kind of config (trainer, PINN, detection) checks its activation this one way."""
    try:
        model["activation"] = get_activation(model["activation"]).spec
    except ValueError as e:
        raise ConfigError(f"model.activation: {e}") from None


def _check_semantics(cfg: dict) -> None:
    model = cfg["model"]
    canonical_activation(model)
    if not is_known_model(model["name"]):
        raise ConfigError(
            f"model.name: unknown model {model['name']!r}; known models: {', '.join(list_models())} "
            f"(or '{TIMM_PREFIX}<timm model name>')"
        )
    if "activation" in model["overrides"]:
        raise ConfigError("model.overrides.activation: set the activation with model.activation")
    try:
        check_data_values(cfg["data"])
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    train = cfg["train"]
    if train["min_lr"] > train["lr"]:
        raise ConfigError(f"train.min_lr ({train['min_lr']}) must not exceed train.lr ({train['lr']})")
    check_amp_device(train["amp"], train["device"])


def check_amp_device(amp: str, device: str) -> None:
    """fp16 autocast needs a GPU (its gradient scaler): checked when a config says train.device=cpu and
    again when a run with train.device=auto finds no GPU (``device``: "auto", "cpu", "cuda", ...)."""
    if amp == "fp16" and device not in ("auto", "cuda"):
        raise ConfigError(f"train.amp=fp16 needs a GPU (the device is {device}); use amp=off or amp=bf16 on CPU")


# --- public entry points ------------------------------------------------------
def default_config() -> dict:
    """The resolved default config (vit_micro on digits)."""
    return resolve_config({})


def read_config_file(path: str | os.PathLike, point: str | None = None) -> dict:
    """The raw mapping of a config file with its ``inherit`` chain merged in (no defaults, no validation).

    A grid file (one with a ``grid:`` section, see :func:`grid_points`) describes many runs:
    ``point`` names the one to read, and is an error for a plain file.
    """
    path = Path(os.path.expanduser(str(path)))
    raw = _load_file(path)
    if GRID_KEY not in raw:
        if point is not None:
            raise ConfigError(f"--point {point}: {path} is a single config, not a grid of runs; drop --point")
        return raw
    points = grid_points(path, raw)
    if point is None:
        raise ConfigError(
            f"{path} is a grid of {len(points)} runs: pick one with --point NAME; points: {', '.join(points)}"
        )
    if point not in points:
        close = difflib.get_close_matches(point, list(points), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"--point {point}: no such point in {path}{hint}; points: {', '.join(points)}")
    return points[point]


# --- grids of runs ---------------------------------------------------------------
def is_grid_file(path: str | os.PathLike) -> bool:
    """True when the config file describes a grid of runs (it has a ``grid:`` section)."""
    return GRID_KEY in _load_file(Path(os.path.expanduser(str(path))))


# Axis names that stand for a key: ``activation: [softmax, x^3/14]`` sets model.activation.
AXIS_KEYS = {"activation": "model.activation", "seed": "train.seed"}


def _label(key: str, value: Any) -> str:
    text = get_activation(value).slug if key == "model.activation" and isinstance(value, str) else str(value)
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in text).strip("-").replace(".", "p") or "none"


def _axis_entries(path: Path, axis: str, spec: Any) -> list[tuple[str, dict, dict]]:
    """(label, what the label inherits, its own settings) per value of one axis.

    An axis is either a key (dotted, or ``activation``/``seed``) with a list of values, or a
    mapping of labels to settings: sections, dotted keys and an optional ``inherit`` of its own.
    """
    if isinstance(spec, list):
        key = AXIS_KEYS.get(axis, axis)
        if "." not in key:
            raise ConfigError(
                f"{path}: grid axis {axis!r} lists values, so its name must be a dotted key such as "
                f"train.lr (or one of {sorted(AXIS_KEYS)}); give a mapping of labels to settings otherwise"
            )
        try:
            return [(_label(key, v), {}, apply_overrides({}, {key: v})) for v in spec]
        except ValueError as e:
            raise ConfigError(f"{path}: grid axis {axis!r}: {e}") from None
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{path}: grid axis {axis!r} must be a list of values or a mapping of labels to settings")
    entries = []
    for label, settings in spec.items():
        if not isinstance(settings, dict):
            raise ConfigError(f"{path}: grid.{axis}.{label} must be a mapping of settings, got {settings!r}")
        settings = dict(settings)
        parents = _inherited(path, settings.pop("inherit", None), (path.resolve(),))
        dotted = {k: v for k, v in settings.items() if "." in str(k)}
        nested = {k: v for k, v in settings.items() if "." not in str(k)}
        entries.append((str(label), parents, apply_overrides(nested, dotted)))
    return entries


def grid_points(path: str | os.PathLike, raw: dict | None = None) -> dict[str, dict]:
    """Every run a grid file describes: point name -> raw config (the name joins the axis labels with _).

    A grid file is an ordinary config (the settings every point shares, ``inherit`` included)
    plus ``grid:``, a mapping of axes whose cartesian product are the points, e.g.

        grid:
          model:
            vit_small: {inherit: base/imagenet_vit.yaml, model.name: vit_small}
            deit_small: {inherit: base/imagenet_deit.yaml, model.name: deit_small}
          activation: [softmax, "x^3/14", x]

    Per point, the files a label inherits come first, then the shared settings, then the labels'
    own settings, in axis order.
    """
    path = Path(os.path.expanduser(str(path)))
    raw = copy.deepcopy(raw if raw is not None else _load_file(path))
    if GRID_KEY not in raw:
        raise ConfigError(f"{path} is a single config, not a grid of runs (it has no 'grid:' section)")
    axes = raw.pop(GRID_KEY)
    if not isinstance(axes, dict) or not axes:
        raise ConfigError(f"{path}: 'grid' must be a mapping of axes, e.g. grid: {{activation: [softmax, x]}}")
    points: dict[str, list[tuple[dict, dict]]] = {"": []}
    for axis, spec in axes.items():
        grown = {}
        for name, parts in points.items():
            for label, parents, layer in _axis_entries(path, str(axis), spec):
                key = f"{name}_{label}" if name else label
                if key in grown:
                    raise ConfigError(f"{path}: two points of the grid are both named {key!r}; relabel one")
                grown[key] = [*parts, (parents, layer)]
        points = grown
    out = {}
    for name, parts in points.items():
        cfg: dict = {}
        for parents, _ in parts:
            cfg = _merge(cfg, parents)
        cfg = _merge(cfg, raw)
        for _, layer in parts:
            cfg = _merge(cfg, layer)
        if raw.get("description"):
            cfg["description"] = f"{raw['description']} [{name}]"
        out[name] = cfg
    return out


def apply_overrides(raw: dict, overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict:
    """``raw`` with ``a.b=value`` strings (values parsed as YAML) or a ``{"a.b": value}`` mapping applied."""
    items = (
        [(k.split("."), v) for k, v in overrides.items()]
        if isinstance(overrides, Mapping)
        else [parse_override(text) for text in overrides or ()]
    )
    for parts, value in items:
        if not all(parts):
            raise ConfigError(f"override {'.'.join(parts)!r}: bad key")
        if parts[0] in META_KEYS:
            raise ConfigError(f"override {'.'.join(parts)}: {parts[0]!r} cannot be overridden")
        if parts[0] == "data" and len(parts) == 2 and parts[1] == "name" and isinstance(raw.get("data"), dict):
            raw = dict(raw)
            raw["data"] = _merge_data(raw["data"], {"name": value})
            continue
        raw = _apply_override(raw, parts, value)
    return raw


def load_config(
    path: str | os.PathLike | None, overrides: Sequence[str] | Mapping[str, Any] = (), point: str | None = None
) -> dict:
    """Read ``path`` (with its ``inherit`` chain), apply overrides (``a.b=value`` strings or a
    ``{"a.b": value}`` mapping, see :func:`apply_overrides`), fill defaults, validate.

    ``point`` picks one run of a grid file (see :func:`grid_points`).
    """
    raw = {} if path is None else read_config_file(path, point)
    return resolve_config(apply_overrides(raw, overrides))


def get_key(cfg: dict, dotted: str) -> Any:
    """``get_key(cfg, "train.lr")``."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


class _Dumper(yaml.SafeDumper):
    """Mappings as blocks, lists on one line: ``patch_size: [16, 32]``."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def dump_config(cfg: dict) -> str:
    """YAML text of a config, sections in the documented order."""
    order = ["description", *_sections()]
    ordered = {k: cfg[k] for k in order if k in cfg}
    ordered.update({k: v for k, v in cfg.items() if k not in ordered})
    return yaml.dump(ordered, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


# --- flat settings (bench, theory) ----------------------------------------------------
def setting(default: Any, kind: str | None = None, **spec: Any) -> Any:
    """A field of a flat settings dataclass (bench, theory), declared as a :class:`Key`.

    ``kind`` defaults to the default's type; ``spec`` holds the Key's ``nullable``, ``choices``,
    ``check`` and ``requirement``. :func:`check_settings` validates the field through it.
    """
    key = Key(default, kind or _key_from_default(default).kind, **spec)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"key": key})
    return field(default=default, metadata={"key": key})


def int_setting(default: int | None, lo: int = 1, requirement: str = "", nullable: bool = False) -> Any:
    """A settings field for an integer >= lo (``requirement``: the words of its error, ">= lo" by default)."""
    return setting(default, "int", nullable=nullable, check=at_least(lo), requirement=requirement or f">= {lo}")


def specs_setting(default: list[str]) -> Any:
    """A settings field for a non-empty list of activation spec strings (each parsed where it is used)."""
    return setting(
        default,
        check=lambda v: len(v) > 0 and all(isinstance(a, str) for a in v),
        requirement="a list of activation spec strings, at least one",
    )


def list_of(ok: Callable[[Any], bool], words: str, empty: bool = False) -> dict[str, Any]:
    """``setting`` arguments for a list (non-empty unless ``empty``) whose items pass ``ok``."""
    return {
        "check": lambda v: (empty or len(v) > 0) and all(ok(x) for x in v),
        "requirement": f"a {'' if empty else 'non-empty '}list of {words}",
    }


def ints_at_least(lo: int) -> dict[str, Any]:
    """``setting`` arguments for a non-empty list of integers >= lo."""
    return list_of(lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= lo, f"integers >= {lo}")


def subset_of(choices: Sequence[str], empty: bool = False) -> dict[str, Any]:
    """``setting`` arguments for a list of some of ``choices``."""
    return list_of(lambda x: x in choices, "some of " + ", ".join(map(str, choices)), empty)


def _settings_key(f: dataclasses.Field) -> Key:
    if "key" in f.metadata:
        return f.metadata["key"]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return _key_from_default(default)


def check_settings(obj: Any, what: str, label: Callable[[str], str] = str) -> None:
    """Validate every field of a settings dataclass through its Key, storing the coerced values.

    A bad value raises ConfigError "<what>: <label(field)> must be ..., got ..." (``label`` gives the
    spelling a user typed, e.g. the command-line option next to the field).
    """
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, _coerce(f"{what}: {label(f.name)}", _settings_key(f), getattr(obj, f.name)))


def settings_from_dict(cls: type, data: Any, what: str, label: Callable[[str], str] = str) -> Any:
    """``cls(**data)`` for a dataclass of flat settings (bench, theory), validated by :func:`check_settings`.

    Not a mapping, or a key the dataclass lacks (with the closest known one), is a ConfigError.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a mapping of settings, got {type(data).__name__}")
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(str(k) for k in set(data) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{what}: unknown key(s) {unknown}{hint}; allowed keys: {known}")
    out = cls(**data)
    check_settings(out, what, label)
    return out


# --- kinds of config ---------------------------------------------------------------------
Section = dict[str, Key] | Callable[[dict], dict[str, Key]]


@dataclass(frozen=True)
class ConfigSchema:
    """A kind of config (the trainer's, PINN runs, detection runs), with the same file rules.

    The same YAML files, ``inherit`` chains, dotted ``--set`` overrides, typed keys and
    did-you-mean errors as :func:`load_config`; ``sections`` maps section names to their keys
    (or to a function of the given section that returns them: the trainer's ``data`` keys depend
    on the dataset it names), ``top`` holds top-level keys, ``presets`` are partial configs layered
    between the defaults and the file (they add the top-level key ``preset``, the first one by
    default), ``check`` validates across keys (raise ConfigError), and ``renamed`` maps an old
    dotted spelling to the current one. Every key states its resume rule (``Key.resume``).
    """

    kind: str
    sections: dict[str, Section]
    top: dict[str, Key] = field(default_factory=dict)
    presets: dict[str, dict] = field(default_factory=dict)
    check: Callable[[dict], None] | None = None
    renamed: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.presets and "preset" not in self.top:
            # The preset's name changes no number: its values show in the keys it sets.
            preset = Key(next(iter(self.presets)), "str", choices=tuple(self.presets), resume="free")
            object.__setattr__(self, "top", {"preset": preset, **self.top})
        static = {name: keys for name, keys in self.sections.items() if not callable(keys)}
        _require_rules(self.kind, {**_dotted(static), **self.top})

    def section_keys(self, name: str, given: Any = None) -> dict[str, Key]:
        """The keys of section ``name`` for the given raw section (it matters to a dynamic section)."""
        keys = self.sections[name]
        if callable(keys):
            keys = keys(given if isinstance(given, dict) else {})
            _require_rules(self.kind, _dotted({name: keys}))
        return keys

    def keys(self, cfg: dict | None = None) -> dict[str, Key]:
        """Every key of a config of this kind as ``{"train.lr": Key, ..., "preset": Key}``.

        ``cfg`` picks the keys of dynamic sections (the trainer's ``data`` by ``data.name``).
        """
        cfg = cfg if isinstance(cfg, dict) else {}
        sections = {name: self.section_keys(name, cfg.get(name)) for name in self.sections}
        return {**_dotted(sections), **self.top}

    def resume_rule(self, key: str, cfg: dict | None = None) -> str:
        """The resume rule of a dotted key: "free", "applied" or "fixed".

        An entry of a mapping key (``model.overrides.depth``) has its key's rule; ``description`` is
        free; a key this schema does not know (removed since a run began) is fixed.
        """
        if key in META_KEYS:
            return "free"
        try:
            keys = self.keys(cfg)
        except ConfigError:  # an unknown dataset: none of its keys can be judged
            return "fixed"
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            spec = keys.get(".".join(parts[:n]))
            if spec is not None:
                return spec.resume or "fixed"
        return "fixed"

    def resolve(self, raw: dict | None) -> dict:
        raw = copy.deepcopy(raw or {})
        if not isinstance(raw, dict):
            raise ConfigError(f"a {self.kind} must be a mapping of sections, got {type(raw).__name__}")
        for old, new in self.renamed.items():
            section, _, key = old.partition(".")
            if isinstance(raw.get(section), dict) and key in raw[section]:
                raise ConfigError(f"{self.kind} key {old} is now called {new}: rename it")
        allowed = [*self.sections, *self.top, *META_KEYS]
        for key in raw:
            if key not in allowed:
                raise _unknown(str(key), allowed, "")
        out: dict = {}
        if raw.get("description") is not None:
            out["description"] = str(raw["description"])
        for key, spec in self.top.items():
            out[key] = _coerce(key, spec, raw.get(key, copy.deepcopy(spec.default)))
        for name in self.sections:
            out[name] = _resolve_section(name, self.section_keys(name, raw.get(name)), raw.get(name))
        if self.check is not None:
            self.check(out)
        return out

    def load(
        self,
        path: str | os.PathLike | None = None,
        overrides: Sequence[str] | Mapping[str, Any] = (),
        preset: str | None = None,
        point: str | None = None,
    ) -> dict:
        """Defaults < the preset (``preset``, else the one the file or overrides name) < file < overrides."""
        raw = apply_overrides({} if path is None else read_config_file(path, point), overrides)
        if self.presets:
            name = preset or raw.get("preset") or self.top["preset"].default
            if name not in self.presets:
                raise ConfigError(f"preset must be one of {sorted(self.presets)}, got {name!r}")
            raw = _merge(copy.deepcopy(self.presets[name]), {**raw, "preset": name})
        return self.resolve(raw)

    def dump(self, cfg: dict) -> str:
        order = ["description", *self.top, *self.sections]
        ordered = {k: cfg[k] for k in order if k in cfg}
        return yaml.dump(ordered, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def _dotted(sections: dict[str, dict[str, Key]]) -> dict[str, Key]:
    return {f"{name}.{key}": spec for name, keys in sections.items() for key, spec in keys.items()}


def _require_rules(kind: str, keys: dict[str, Key]) -> None:
    missing = [k for k, spec in keys.items() if spec.resume is None]
    if missing:
        raise ValueError(f"{kind}: keys {missing} declare no resume rule (Key.resume: one of {list(RESUME_RULES)})")


def resume_table(schema: ConfigSchema) -> str:
    """A markdown table of the keys of ``schema`` by section and resume rule (docs/training.md's tables)."""

    def by_rule(keys: dict[str, Key]) -> dict[str, list[str]]:
        return {rule: [f"`{k}`" for k, spec in keys.items() if spec.resume == rule] for rule in RESUME_RULES}

    rows = {"(top level)": by_rule(schema.top)} if schema.top else {}
    for name, keys in schema.sections.items():
        rows[name] = keys.by_rule() if hasattr(keys, "by_rule") else by_rule(keys)
    lines = ["| section | " + " | ".join(RESUME_RULES) + " |", "|---" * (len(RESUME_RULES) + 1) + "|"]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(", ".join(cells[rule]) for rule in RESUME_RULES) + " |")
    return "\n".join(lines)
