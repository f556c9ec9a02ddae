"""Finding a run's post-hoc EMA snapshots in MLflow: its READY LoggedModels of kind
``posthoc``, one per (``sigma_rel``, step). A resumed run may have logged a step twice
(before the crash and after the resume): the later one is the run's, the other is left out."""

from __future__ import annotations

import dataclasses
from typing import Any

from mlflow_ema.errors import PosthocError
from mlflow_ema.selection import Candidate, _candidate, _checkpoints, _of_one_model, is_soup_run
from mlflow_ema.tags import TAG_SIGMA_REL


@dataclasses.dataclass(frozen=True)
class PosthocSnapshot:
    """A snapshot of the power-function EMA of ``sigma_rel`` at ``candidate.step``."""

    candidate: Candidate
    sigma_rel: float
    created: int  # creation timestamp (ms): the later of two snapshots of one step wins

    @property
    def step(self) -> int:
        return self.candidate.step

    @property
    def model_id(self) -> str:
        return self.candidate.model_id


def find_snapshots(run_id: str, model_name: str | None = None, client: Any = None) -> list[PosthocSnapshot]:
    """The run's usable snapshots (of ``model_name`` in a run that trains several), by
    ``sigma_rel`` then step. One-line errors for an unknown run and a run with none."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    try:
        run = client.get_run(run_id)
    except Exception:
        raise PosthocError(f"unknown run {run_id!r}") from None
    if is_soup_run(run):
        raise PosthocError(f"run {run_id} is a soup run ({run.info.run_name}): it has no post-hoc snapshots")
    names = {run_id: run.info.run_name}
    models = _checkpoints(client, [run.info.experiment_id], "posthoc", {run_id})
    candidates = {m.model_id: _candidate(m, "", names) for m in models}
    if not candidates:
        raise PosthocError(
            f"run {run_id} has no READY post-hoc EMA snapshots (train it with "
            "mlflow_ema.autolog(posthoc_every_n_steps=N))"
        )
    chosen = {
        c.model_id for c in _of_one_model({run_id: list(candidates.values())}, model_name, names)[run_id]
    }
    latest: dict[tuple[float, int], PosthocSnapshot] = {}
    for model in models:
        if model.model_id not in chosen:
            continue
        snapshot = _snapshot(model, candidates[model.model_id])
        key = (snapshot.sigma_rel, snapshot.step)
        if key not in latest or snapshot.created > latest[key].created:
            latest[key] = snapshot
    return sorted(latest.values(), key=lambda s: (s.sigma_rel, s.step))


def _snapshot(model: Any, candidate: Candidate) -> PosthocSnapshot:
    try:
        sigma_rel = float(model.tags[TAG_SIGMA_REL])
    except (KeyError, ValueError):
        raise PosthocError(
            f"snapshot {model.name} ({model.model_id}) has no valid {TAG_SIGMA_REL} tag"
        ) from None
    if candidate.step < 1:
        raise PosthocError(f"snapshot {model.name} ({model.model_id}) has no valid step tag")
    return PosthocSnapshot(candidate, sigma_rel, int(model.creation_timestamp or 0))
