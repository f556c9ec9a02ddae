"""``mlflow_ema.resume()``: continue a killed run where its last checkpoint left it."""

from __future__ import annotations

import dataclasses
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlflow_ema.architecture import load_weights
from mlflow_ema.ema import unwrap_model
from mlflow_ema.errors import CheckpointError, IncompatibleModelError, MlflowEmaError
from mlflow_ema.tags import TAG_KIND, TAG_MODEL_NAME, TAG_STEP, TAG_TRAINING_STATE


@dataclasses.dataclass(frozen=True)
class ResumeInfo:
    step: int
    epoch: int | None
    run_id: str | None
    model_id: str | None


def as_list(value: Any | Sequence[Any] | None) -> list[Any]:
    """An optimizer (scheduler), a list of them, or None, as a list."""
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def restore(
    model: nn.Module,
    optimizers: list[Any],
    schedulers: list[Any],
    *,
    run_id: str | None,
    checkpoint: str | Path | None,
    name: str | None = None,
) -> tuple[dict[str, Any], ResumeInfo]:
    """Load the weights, optimizer, scheduler and RNG states of the latest checkpoint with a
    training state; returns that state (the EMA's is in it) and where training continues."""
    from mlflow_ema.checkpoint import load_checkpoint, load_training_state

    model_id = None
    with tempfile.TemporaryDirectory(prefix="mlflow-ema-resume-") as tmp:
        if checkpoint is None:
            checkpoint, model_id, run_id = _download_latest(
                run_id, Path(tmp), name or type(unwrap_model(model)).__name__.lower()
            )
        state_dict, _manifest = load_checkpoint(checkpoint)
        state = load_training_state(checkpoint)
    load_weights(unwrap_model(model), state_dict, what="the checkpoint's weights")
    if len(state["optimizers"]) != len(optimizers) or len(state["schedulers"]) < len(schedulers):
        raise IncompatibleModelError(
            f"checkpoint holds {len(state['optimizers'])} optimizer and {len(state['schedulers'])} "
            f"scheduler states; {len(optimizers)} and {len(schedulers)} were passed"
        )
    for opt, opt_state in zip(optimizers, state["optimizers"], strict=False):
        opt.load_state_dict(opt_state)
    for sched, sched_state in zip(schedulers, state["schedulers"], strict=False):
        sched.load_state_dict(sched_state)
    _set_rng(state["rng"])
    return state, ResumeInfo(step=int(state["step"]), epoch=state["epoch"], run_id=run_id, model_id=model_id)


def _set_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))


def _download_latest(run_id: str | None, tmp: Path, name: str) -> tuple[Path, str, str]:
    """The run's latest READY raw checkpoint with a training state, downloaded to ``tmp``; of
    the model ``name`` when the run trains several (their ``mlflow_ema.model_name``)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    if run_id is None:
        run = mlflow.active_run()
        if run is None:
            raise MlflowEmaError("resume() needs run_id=, a checkpoint= folder, or an active run")
        run_id = run.info.run_id
    client = MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=(
            f"source_run_id = '{run_id}' AND tags.`{TAG_KIND}` = 'raw' AND tags.`{TAG_TRAINING_STATE}` = 'true'"
        ),
    )
    models = [m for m in models if m.status == LoggedModelStatus.READY]  # never a half-uploaded one
    names = {m.tags.get(TAG_MODEL_NAME) for m in models}
    if len(names) > 1:  # several models: this one's
        models = [m for m in models if m.tags.get(TAG_MODEL_NAME) == name]
        if not models:
            raise CheckpointError(
                f"run {run_id} trains several models ({', '.join(sorted(n or '?' for n in names))}), none named "
                f"{name!r}: pass resume(..., name=...)"
            )
    if not models:
        raise CheckpointError(
            f"run {run_id} has no complete checkpoint with training state "
            "(log them with autolog(log_training_state=True))"
        )
    latest = max(models, key=lambda m: int(m.tags.get(TAG_STEP, -1)))
    local = mlflow.artifacts.download_artifacts(artifact_uri=latest.artifact_location, dst_path=str(tmp))
    return Path(local), latest.model_id, run_id
