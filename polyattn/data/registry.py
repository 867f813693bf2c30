"""Dataset registry: ``build_dataset(cfg_data, seed) -> DataBundle``.

A builder is ``fn(cfg_data: dict, seed: int) -> DataBundle`` registered with
``@register_dataset(name, defaults={...}, choices={...}, checks={...})``. ``defaults``
declares the config keys the dataset accepts besides the common ones (``name``,
``root``, ``seed``, ``num_workers``), so that ``data.<key>`` is validated per dataset;
``checks`` maps a key to ``(predicate, requirement)``, e.g.
``{"val_fraction": in_range(0, 1)}``, tested (with ``choices``) by :func:`check_data_values`, at config
time and before the builder runs. A resume may change only the keys that change no number (``root``,
``num_workers`` and the dataset's ``free`` keys, such as a generator's worker count).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from ..utils.registry import Registry
from .errors import DatasetError

__all__ = [
    "COMMON_DATA_KEYS",
    "Check",
    "DataBundle",
    "IMAGE_SIZE",
    "build_dataset",
    "check_data_values",
    "dataset_checks",
    "dataset_choices",
    "dataset_defaults",
    "dataset_resume_rules",
    "in_range",
    "int_at_least",
    "list_datasets",
    "register_dataset",
]

# Keys every dataset accepts. ``seed`` fixes generated data and validation
# splits independently of ``train.seed``, so runs with different training seeds
# are scored on the same validation set.
COMMON_DATA_KEYS: dict[str, Any] = {"name": "digits", "root": None, "seed": 0, "num_workers": 0}
# Of those, the ones that change no number: where the files are and how many workers load them.
_FREE_COMMON = ("root", "num_workers")


@dataclass
class DataBundle:
    """The splits of a dataset plus what the model needs to know about them."""

    train: Dataset
    val: Dataset
    test: Dataset | None
    num_classes: int
    model_overrides: dict  # passed to create_model, e.g. {"img_size": 8, "in_chans": 1, "num_classes": 10}
    info: dict = field(default_factory=dict)  # free-form description for logs and reports


Builder = Callable[[dict, int], DataBundle]

# (predicate, requirement): the value passes when predicate(value) is true; the
# requirement reads "data.<key> must be <requirement>", as the config loader's own checks.
Check = tuple[Callable[[Any], bool], str]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_at_least(lo: int, nullable: bool = False) -> Check:
    """Check for an int >= lo (or None when ``nullable``)."""
    words = f"an int >= {lo}" + (" or null" if nullable else "")
    return (lambda v: (nullable and v is None) or (_is_int(v) and v >= lo)), words


def in_range(lo: float, hi: float, lo_closed: bool = False, hi_closed: bool = False) -> Check:
    """Check for a finite number in the interval from lo to hi (open ends unless closed)."""

    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (lo <= v if lo_closed else lo < v) and (v <= hi if hi_closed else v < hi)

    return ok, f"in {'[' if lo_closed else '('}{lo:g}, {hi:g}{']' if hi_closed else ')'}"


def _is_size(v: Any) -> bool:
    return (_is_int(v) and v > 0) or (
        isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(i) and i > 0 for i in v)
    )


# data.image_size of the image datasets: 32 or [height, width].
IMAGE_SIZE: Check = (_is_size, "a positive int or [height, width] of positive ints")


# Each entry's meta holds the dataset's ``defaults``, ``choices`` and ``checks``.
_DATASETS: Registry[Builder] = Registry("dataset", error=DatasetError)


def register_dataset(
    name: str,
    defaults: dict | None = None,
    choices: dict[str, tuple] | None = None,
    checks: dict[str, Check] | None = None,
    free: tuple[str, ...] = (),
) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(cfg_data, seed) -> DataBundle`` as dataset ``name``.

    ``defaults``: dataset-specific config keys and their default values.
    ``choices``: allowed values for some of those keys.
    ``checks``: ``key -> (predicate, requirement)`` for keys whose values have a
    range (fractions, sizes). Both are tested by :func:`check_data_values`.
    ``free``: keys that change no number of a run (e.g. a generator's worker count), so a resume
    may change them; every other dataset key is fixed on resume (it chose the data).
    """
    defaults = dict(defaults or {})
    choices = {k: tuple(v) for k, v in (choices or {}).items()}
    checks = dict(checks or {})
    for key, check in checks.items():
        if not (isinstance(check, tuple) and len(check) == 2 and callable(check[0]) and isinstance(check[1], str)):
            raise ValueError(f"dataset {name!r}: checks[{key!r}] must be (predicate, requirement), got {check!r}")
    clash = set(defaults) & set(COMMON_DATA_KEYS)
    if clash:
        raise ValueError(f"dataset {name!r}: keys {sorted(clash)} are common data keys and cannot be redefined")
    for what, keys in (("choices", choices), ("checks", checks), ("free", free)):
        unknown = set(keys) - set(defaults) - set(COMMON_DATA_KEYS)
        if unknown:
            raise ValueError(f"dataset {name!r}: {what} given for undeclared keys {sorted(unknown)}")
    return _DATASETS.register(name, defaults=defaults, choices=choices, checks=checks, free=tuple(free))


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return _DATASETS.names()


def dataset_defaults(name: str) -> dict:
    """All keys the ``data`` section accepts for dataset ``name``, with their defaults."""
    out = copy.deepcopy(COMMON_DATA_KEYS)
    out["name"] = name
    out.update(copy.deepcopy(_DATASETS.entry(name).meta["defaults"]))
    return out


def dataset_choices(name: str) -> dict[str, tuple]:
    """Allowed values of the dataset's enumerated keys (e.g. ``augment``)."""
    return dict(_DATASETS.entry(name).meta["choices"])


def dataset_checks(name: str) -> dict[str, Check]:
    """``key -> (predicate, requirement)`` of the dataset's range-checked keys (e.g. ``val_fraction``)."""
    return dict(_DATASETS.entry(name).meta["checks"])


def dataset_resume_rules(name: str) -> dict[str, str]:
    """``key -> "free" | "fixed"`` for every key of dataset ``name`` (the resume rule of ``data.<key>``)."""
    free = (*_FREE_COMMON, *_DATASETS.entry(name).meta["free"])
    return {key: "free" if key in free else "fixed" for key in dataset_defaults(name)}


def check_data_values(cfg_data: dict) -> None:
    """Raise DatasetError for a value outside the dataset's ``choices`` or ``checks``.

    The one test of those values: the config loader runs it before any run directory exists,
    :func:`build_dataset` before the builder runs. ``cfg_data`` holds every key (defaults filled in).
    """
    name = cfg_data["name"]
    for key, allowed in dataset_choices(name).items():
        if cfg_data[key] not in allowed:
            raise DatasetError(f"data.{key} must be one of {list(allowed)} for dataset {name!r}, got {cfg_data[key]!r}")
    for key, (predicate, requirement) in dataset_checks(name).items():
        try:
            ok = bool(predicate(cfg_data[key]))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise DatasetError(f"data.{key} must be {requirement}, got {cfg_data[key]!r} (dataset {name!r})")


def _check_splits(name: str, bundle: DataBundle) -> None:
    # A loader that lets an empty split through would train 0 steps or score on
    # nothing and still exit 0; the loaders name the file, this catches the rest.
    for split in ("train", "val", "test"):
        ds = getattr(bundle, split)
        if ds is None:
            continue
        try:
            n = len(ds)
        except TypeError:  # an iterable dataset: its length is not known up front
            continue
        if n == 0:
            where = f" ({bundle.info['source']})" if bundle.info.get("source") else ""
            raise DatasetError(
                f"dataset {name!r}: the {split} split is empty{where}; check data.root and the data.* sizes"
            )


def build_dataset(cfg_data: dict, seed: int) -> DataBundle:
    """Build the dataset named ``cfg_data["name"]``; missing keys take their defaults.

    ``seed`` is the training seed; the data's own seed (splits, generated data)
    is ``cfg_data["seed"]``.
    """
    if "name" not in cfg_data:
        raise DatasetError(f"the data section needs a 'name'; known datasets: {', '.join(list_datasets())}")
    name = cfg_data["name"]
    resolved = dataset_defaults(name)
    unknown = sorted(set(cfg_data) - set(resolved))
    if unknown:
        raise DatasetError(
            f"unknown key(s) {', '.join('data.' + k for k in unknown)} for dataset {name!r}; "
            f"allowed: {', '.join(sorted(resolved))}"
        )
    resolved.update(cfg_data)
    check_data_values(resolved)
    bundle = _DATASETS.get(name)(resolved, seed)
    if not isinstance(bundle, DataBundle):
        raise TypeError(f"dataset builder {name!r} returned {type(bundle).__name__}, expected DataBundle")
    _check_splits(name, bundle)
    return bundle
