"""Training: configs (``load_config``), the trainer (``train``) and run loading (``load_run``)."""

from .config import (
    ConfigError,
    default_config,
    dump_config,
    get_key,
    load_config,
    register_config_section,
    resolve_config,
)
from .trainer import RunExistsError, load_run, train

__all__ = [
    "ConfigError",
    "RunExistsError",
    "default_config",
    "dump_config",
    "get_key",
    "load_config",
    "load_run",
    "register_config_section",
    "resolve_config",
    "train",
]
