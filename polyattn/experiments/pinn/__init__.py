"""Physics-informed transformers: train a PINNsFormer (any attention activation) or an MLP PINN on a PDE.

    >>> from polyattn.experiments.pinn import resolve_pinn_config, run_pinn
    >>> cfg = resolve_pinn_config(None, {"pde.name": "wave", "model.activation": "x^3/sqrt(N)"}, quick=True)
    >>> metrics = run_pinn(cfg, "runs/pinn/wave_x3")          # doctest: +SKIP
    >>> metrics["rMAE"], metrics["rRMSE"]                      # doctest: +SKIP

Pieces: :mod:`.config` (the config and its presets), :mod:`.problem` (batch, loss, errors),
:mod:`.loop` (training, checkpoints, resume), :mod:`.report` (figures, comparison table).
"""

from .config import PINN_CONFIG, PRESETS, parse_set, resolve_pinn_config, validate_pinn_config
from .loop import NonFiniteLossError, load_pinn_run, run_pinn
from .problem import (
    PinnBatch,
    build_batch,
    build_model_from_config,
    evaluate,
    grid,
    pinn_loss,
    predict,
    relative_errors,
)
from .report import compare_runs, plot_fields, plot_loss, summary_row

__all__ = [
    "PINN_CONFIG",
    "PRESETS",
    "NonFiniteLossError",
    "PinnBatch",
    "build_batch",
    "build_model_from_config",
    "compare_runs",
    "evaluate",
    "grid",
    "load_pinn_run",
    "parse_set",
    "pinn_loss",
    "plot_fields",
    "plot_loss",
    "predict",
    "relative_errors",
    "resolve_pinn_config",
    "run_pinn",
    "summary_row",
    "validate_pinn_config",
]
