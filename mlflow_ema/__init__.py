"""mlflow-ema: exponential moving averages and checkpoint soups for MLflow-tracked PyTorch.

The public API is exported here. Names resolve on first use, so that importing
the package (as the ``mlflow-ema`` command does) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mlflow_ema._version import __version__

_EXPORTS = {
    "AverageOptions": "mlflow_ema.average_options",
    "average_runs": "mlflow_ema.workflow",
    "average_checkpoints": "mlflow_ema.soup",
    "promote": "mlflow_ema.registry",
    "autolog": "mlflow_ema.tracking",
    "watch": "mlflow_ema.tracking",
    "log_checkpoint": "mlflow_ema.tracking",
    "swap": "mlflow_ema.tracking",
    "flush": "mlflow_ema.tracking",
    "resume": "mlflow_ema.tracking",
    "get_ema": "mlflow_ema.tracking",
    "ResumeInfo": "mlflow_ema.tracking",
    "EMA": "mlflow_ema.ema",
    "unwrap_model": "mlflow_ema.ema",
    "ConstantDecay": "mlflow_ema.schedules",
    "WarmupDecay": "mlflow_ema.schedules",
    "RampDecay": "mlflow_ema.schedules",
    "HalfLifeDecay": "mlflow_ema.schedules",
    "BiasCorrectedDecay": "mlflow_ema.schedules",
    "PowerFunctionDecay": "mlflow_ema.schedules",
    "posthoc_coefficients": "mlflow_ema.posthoc_math",
    "PosthocOptions": "mlflow_ema.posthoc_options",
    "reconstruct_ema": "mlflow_ema.posthoc",
    "Checkpoint": "mlflow_ema.checkpoint",
    "Manifest": "mlflow_ema.checkpoint",
    "save_checkpoint": "mlflow_ema.checkpoint",
    "load_checkpoint": "mlflow_ema.loading",
    "load_state_dict": "mlflow_ema.loading",
    "load_model": "mlflow_ema.loading",
    "load_training_state": "mlflow_ema.checkpoint",
    "read_manifest": "mlflow_ema.checkpoint",
    "verify_checkpoint": "mlflow_ema.checkpoint",
    "init_fingerprint": "mlflow_ema.checkpoint",
    "MlflowEmaError": "mlflow_ema.errors",
    "IncompatibleModelError": "mlflow_ema.errors",
    "CheckpointError": "mlflow_ema.errors",
    "ChecksumMismatchError": "mlflow_ema.errors",
    "SelectionError": "mlflow_ema.errors",
    "AveragingError": "mlflow_ema.errors",
    "RegistryError": "mlflow_ema.errors",
    "StoreError": "mlflow_ema.errors",
    "UntrustedCodeError": "mlflow_ema.errors",
    "PosthocError": "mlflow_ema.errors",
}

__all__ = [
    "EMA",
    "AverageOptions",
    "AveragingError",
    "BiasCorrectedDecay",
    "Checkpoint",
    "CheckpointError",
    "ChecksumMismatchError",
    "ConstantDecay",
    "HalfLifeDecay",
    "IncompatibleModelError",
    "Manifest",
    "MlflowEmaError",
    "PosthocError",
    "PosthocOptions",
    "PowerFunctionDecay",
    "RampDecay",
    "RegistryError",
    "ResumeInfo",
    "SelectionError",
    "StoreError",
    "UntrustedCodeError",
    "WarmupDecay",
    "__version__",
    "autolog",
    "average_checkpoints",
    "average_runs",
    "flush",
    "get_ema",
    "init_fingerprint",
    "load_checkpoint",
    "load_model",
    "load_state_dict",
    "load_training_state",
    "log_checkpoint",
    "posthoc_coefficients",
    "promote",
    "read_manifest",
    "reconstruct_ema",
    "resume",
    "save_checkpoint",
    "swap",
    "unwrap_model",
    "verify_checkpoint",
    "watch",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlflow_ema' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from mlflow_ema.checkpoint import (
        Checkpoint,
        Manifest,
        init_fingerprint,
        load_training_state,
        read_manifest,
        save_checkpoint,
        verify_checkpoint,
    )
    from mlflow_ema.ema import EMA, unwrap_model
    from mlflow_ema.errors import (
        AveragingError,
        CheckpointError,
        ChecksumMismatchError,
        IncompatibleModelError,
        MlflowEmaError,
        PosthocError,
        RegistryError,
        SelectionError,
        StoreError,
        UntrustedCodeError,
    )
    from mlflow_ema.loading import load_checkpoint, load_model, load_state_dict
    from mlflow_ema.posthoc import reconstruct_ema
    from mlflow_ema.posthoc_math import posthoc_coefficients
    from mlflow_ema.posthoc_options import PosthocOptions
    from mlflow_ema.registry import promote
    from mlflow_ema.schedules import (
        BiasCorrectedDecay,
        ConstantDecay,
        HalfLifeDecay,
        PowerFunctionDecay,
        RampDecay,
        WarmupDecay,
    )
    from mlflow_ema.soup import average_checkpoints
    from mlflow_ema.tracking import ResumeInfo, autolog, flush, get_ema, log_checkpoint, resume, swap, watch
    from mlflow_ema.workflow import AverageOptions, average_runs
