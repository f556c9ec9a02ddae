"""Rebuilding a model from what its run recorded, without pickle.

``autolog(model_factory="pkg.module:function", model_kwargs={...})`` (or ``watch``) tags
the run with the factory and its keyword arguments; the Lightning callback tags the
LightningModule's class and ``hparams``. :func:`build_model` calls the one it finds.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlflow_ema.errors import MlflowEmaError

RUN_TAG_MODEL_CLASS = "mlflow_ema.model_class"
RUN_TAG_MODEL_FACTORY = "mlflow_ema.model_factory"
RUN_TAG_MODEL_KWARGS = "mlflow_ema.model_kwargs"
RUN_TAG_MODEL_HPARAMS = "mlflow_ema.model_hparams"


def resolve_callable(spec: str) -> Callable[..., Any]:
    """``"package.module:attribute"`` (the working directory is importable, as for
    ``python -m``)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise MlflowEmaError(f"{spec!r} is not of the form 'package.module:function'")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as e:
        raise MlflowEmaError(f"cannot import {spec!r}: {e}") from None
    if not callable(target):
        raise MlflowEmaError(f"{spec!r} is not callable")
    return target


def build_model(
    tags: Mapping[str, str], *, model_factory: str | None = None, model_kwargs: dict | None = None
):
    """A fresh module of the architecture a run recorded (``tags``: the run's tags), or
    of ``model_factory`` when given."""
    factory = model_factory or tags.get(RUN_TAG_MODEL_FACTORY)
    if factory:
        kwargs = (
            model_kwargs if model_kwargs is not None else json.loads(tags.get(RUN_TAG_MODEL_KWARGS) or "{}")
        )
        return resolve_callable(factory)(**kwargs)
    if RUN_TAG_MODEL_HPARAMS in tags and RUN_TAG_MODEL_CLASS in tags:
        return resolve_callable(tags[RUN_TAG_MODEL_CLASS])(**json.loads(tags[RUN_TAG_MODEL_HPARAMS]))
    raise MlflowEmaError(
        "the run records no way to rebuild its model: pass model_factory= to mlflow_ema.autolog() or "
        "watch() when training, or --model-factory here"
    )
