"""Datasets: a registry (``build_dataset``) of image classification data.

Built in: ``digits`` (scikit-learn's 8x8 digits, no download), ``synthetic``
(generated), ``tiny_imagenet``, ``imagenet`` / ``image_folder`` (class folders)
and ``cifar10`` / ``cifar100`` (python-pickle release) read from ``data.root``.
"""

from . import cifar, digits, images, synthetic  # noqa: F401  (registers the datasets)
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

from . import lra  # noqa: E402,F401  (registers the Long Range Arena datasets)
