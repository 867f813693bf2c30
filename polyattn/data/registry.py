"""Dataset registry: ``build_dataset(cfg_data, seed) -> DataBundle``.

A builder is ``fn(cfg_data: dict, seed: int) -> DataBundle`` registered with
``@register_dataset(name, defaults={...}, choices={...})``. ``defaults`` declares the
config keys the dataset accepts besides the common ones (``name``, ``root``,
``seed``, ``num_workers``), so that ``data.<key>`` is validated per dataset.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

__all__ = [
    "COMMON_DATA_KEYS",
    "DataBundle",
    "build_dataset",
    "dataset_choices",
    "dataset_defaults",
    "list_datasets",
    "register_dataset",
]

# Keys every dataset accepts. ``seed`` fixes generated data and validation
# splits independently of ``train.seed``, so runs with different training seeds
# are scored on the same validation set.
COMMON_DATA_KEYS: dict[str, Any] = {"name": "digits", "root": None, "seed": 0, "num_workers": 0}


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


@dataclass(frozen=True)
class _Entry:
    builder: Builder
    defaults: dict
    choices: dict


_DATASETS: dict[str, _Entry] = {}

# Modules whose import registers datasets; imported on first lookup.
_PROVIDERS: tuple[str, ...] = (
    "polyattn.data.digits",
    "polyattn.data.synthetic",
    "polyattn.data.images",
    "polyattn.data.cifar",
)
_providers_loaded = False


def _load_providers() -> None:
    global _providers_loaded
    if _providers_loaded:
        return
    _providers_loaded = True
    for module in _PROVIDERS:
        importlib.import_module(module)


def register_dataset(
    name: str, defaults: dict | None = None, choices: dict[str, tuple] | None = None
) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(cfg_data, seed) -> DataBundle`` as dataset ``name``.

    ``defaults``: dataset-specific config keys and their default values.
    ``choices``: allowed values for some of those keys, checked by the config loader.
    """
    defaults = dict(defaults or {})
    choices = {k: tuple(v) for k, v in (choices or {}).items()}
    clash = set(defaults) & set(COMMON_DATA_KEYS)
    if clash:
        raise ValueError(
            f"dataset {name!r}: keys {sorted(clash)} are common data keys and cannot be redefined"
        )
    unknown = set(choices) - set(defaults) - set(COMMON_DATA_KEYS)
    if unknown:
        raise ValueError(f"dataset {name!r}: choices given for undeclared keys {sorted(unknown)}")

    def decorator(fn: Builder) -> Builder:
        if name in _DATASETS and _DATASETS[name].builder is not fn:
            raise ValueError(
                f"dataset {name!r} is already registered (by {_DATASETS[name].builder.__module__})"
            )
        _DATASETS[name] = _Entry(fn, defaults, choices)
        return fn

    return decorator


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    _load_providers()
    return sorted(_DATASETS)


def _entry(name: str) -> _Entry:
    _load_providers()
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[name]


def dataset_defaults(name: str) -> dict:
    """All keys the ``data`` section accepts for dataset ``name``, with their defaults."""
    out = copy.deepcopy(COMMON_DATA_KEYS)
    out["name"] = name
    out.update(copy.deepcopy(_entry(name).defaults))
    return out


def dataset_choices(name: str) -> dict[str, tuple]:
    """Allowed values of the dataset's enumerated keys (e.g. ``augment``)."""
    return dict(_entry(name).choices)


def build_dataset(cfg_data: dict, seed: int) -> DataBundle:
    """Build the dataset named ``cfg_data["name"]``; missing keys take their defaults.

    ``seed`` is the training seed; the data's own seed (splits, generated data)
    is ``cfg_data["seed"]``.
    """
    if "name" not in cfg_data:
        raise ValueError(f"the data section needs a 'name'; known datasets: {', '.join(list_datasets())}")
    name = cfg_data["name"]
    resolved = dataset_defaults(name)
    unknown = sorted(set(cfg_data) - set(resolved))
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join('data.' + k for k in unknown)} for dataset {name!r}; "
            f"allowed: {', '.join(sorted(resolved))}"
        )
    resolved.update(cfg_data)
    for key, allowed in dataset_choices(name).items():
        if resolved[key] not in allowed:
            raise ValueError(
                f"data.{key} must be one of {list(allowed)} for dataset {name!r}, got {resolved[key]!r}"
            )
    bundle = _entry(name).builder(resolved, seed)
    if not isinstance(bundle, DataBundle):
        raise TypeError(f"dataset builder {name!r} returned {type(bundle).__name__}, expected DataBundle")
    return bundle
