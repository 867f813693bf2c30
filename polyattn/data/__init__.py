"""Datasets: a registry (``build_dataset``) of image classification data.

Built in: ``digits`` (scikit-learn's 8x8 digits, no download), ``synthetic``
(generated), ``tiny_imagenet``, ``imagenet`` / ``image_folder`` (class folders)
and ``cifar10`` / ``cifar100`` (python-pickle release) read from ``data.root``;
the Long Range Arena tasks (``lra_*``) are in :mod:`polyattn.data.lra`.
"""

# Importing the loader modules registers their datasets; the registry has no other way to find them.
from . import cifar, digits, images, lra, mqar, synthetic  # noqa: F401
from .errors import DatasetError, DatasetFormatError, DatasetNotFoundError
from .registry import (
    COMMON_DATA_KEYS,
    DataBundle,
    build_dataset,
    dataset_checks,
    dataset_choices,
    dataset_defaults,
    list_datasets,
    register_dataset,
)

__all__ = [
    "COMMON_DATA_KEYS",
    "DataBundle",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "build_dataset",
    "dataset_checks",
    "dataset_choices",
    "dataset_defaults",
    "list_datasets",
    "register_dataset",
]
