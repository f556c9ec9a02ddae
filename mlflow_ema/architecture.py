"""Rebuilding a model from what its run recorded, without pickle.

``autolog(model_factory="pkg.module:function", model_kwargs={...})`` (or ``watch``) tags
the run with the factory and its keyword arguments; the Lightning callback tags the
LightningModule's class and ``hparams``. :func:`build_model` calls the one it finds, if
the user trusts its module (:mod:`mlflow_ema.trust`): tags are data anyone with access to
the tracking server can write, never a reason to run code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mlflow_ema.average_options import json_object
from mlflow_ema.errors import IncompatibleModelError, MlflowEmaError
from mlflow_ema.tags import (
    RUN_TAG_MODEL_CLASS,
    RUN_TAG_MODEL_FACTORY,
    RUN_TAG_MODEL_HPARAMS,
    RUN_TAG_MODEL_KWARGS,
)
from mlflow_ema.trust import check_recorded, resolve_callable


def recorded_builder(tags: Mapping[str, str]) -> tuple[str, str, str] | None:
    """(kind, callable, kwargs JSON) of what a run recorded to rebuild its model, or None.
    ``kind`` says what it is in messages: "model factory" or "LightningModule class"."""
    if tags.get(RUN_TAG_MODEL_FACTORY):
        return "model factory", tags[RUN_TAG_MODEL_FACTORY], tags.get(RUN_TAG_MODEL_KWARGS) or "{}"
    if RUN_TAG_MODEL_HPARAMS in tags and tags.get(RUN_TAG_MODEL_CLASS):
        return "LightningModule class", tags[RUN_TAG_MODEL_CLASS], tags[RUN_TAG_MODEL_HPARAMS]
    return None


def check_rebuildable(
    tags: Mapping[str, str], *, run_id: str, model_factory: str | None = None, trusted: Iterable[str] = ()
) -> None:
    """Fail before any download or import when the model cannot be rebuilt: nothing was
    recorded, or what was recorded is not trusted. A ``model_factory`` the user gives wins."""
    if model_factory:
        return
    recorded = recorded_builder(tags)
    if recorded is None:
        raise MlflowEmaError(
            f"run {run_id} records no way to rebuild its model: pass model_factory= to mlflow_ema.autolog() or "
            "watch() when training, or --model-factory here"
        )
    kind, spec, _ = recorded
    check_recorded(spec, trusted, what=f"run {run_id} recorded {kind}")


def build_model(
    tags: Mapping[str, str],
    *,
    run_id: str = "?",
    model_factory: str | None = None,
    model_kwargs: dict | None = None,
    trusted: Iterable[str] = (),
):
    """A fresh module of the architecture a run recorded (``tags``: the run's tags), or of
    ``model_factory`` when the user gives one. A recorded callable is imported only when its
    module is under one of the ``trusted`` prefixes."""
    check_rebuildable(tags, run_id=run_id, model_factory=model_factory, trusted=trusted)
    recorded = recorded_builder(tags)
    if model_factory:
        spec, factory = model_factory, resolve_callable(model_factory)
    else:
        kind, spec, _ = recorded  # type: ignore[misc]  # checked above
        factory = resolve_callable(spec, trusted=trusted, what=f"run {run_id} recorded {kind}")
    kwargs = model_kwargs if model_kwargs is not None else _kwargs(recorded[2] if recorded else "{}", run_id)
    try:
        model = factory(**kwargs)
    except Exception as e:  # the user's code: say which call failed, in one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise MlflowEmaError(
            f"building the model with {spec}(**{kwargs}) failed: {type(e).__name__}: {first}"
        ) from e
    if not callable(getattr(model, "state_dict", None)) or not callable(
        getattr(model, "load_state_dict", None)
    ):
        raise MlflowEmaError(f"{spec}(**{kwargs}) returned a {type(model).__name__}, not a torch module")
    return model


def _kwargs(text: str, run_id: str) -> dict[str, Any]:
    return json_object(text, f"run {run_id}: the recorded model arguments") or {}


def load_weights(model: Any, state_dict: Mapping[str, Any], *, what: str = "the weights") -> None:
    """``model.load_state_dict(state_dict)``, refusing first, in one line, weights that do not
    fit: the first mismatching tensors with both shapes, and missing or unexpected names."""
    own = model.state_dict()
    problems = [
        f"{name!r} is {list(state_dict[name].shape)} in {what} but {list(own[name].shape)} in the model"
        for name in own
        if name in state_dict and tuple(state_dict[name].shape) != tuple(own[name].shape)
    ]
    missing = [name for name in own if name not in state_dict]
    extra = [name for name in state_dict if name not in own]
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the model missing from {what} (e.g. {missing[0]!r})")
    if extra:
        problems.append(f"{len(extra)} tensor(s) of {what} not in the model (e.g. {extra[0]!r})")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise IncompatibleModelError(f"{what} do not fit {type(model).__name__}: {shown}")
    model.load_state_dict(state_dict)
