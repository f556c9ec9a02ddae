"""Choosing the checkpoints to average: the top-k runs of a sweep, or the top-k
checkpoints of one run, ranked by a metric linked to the checkpoints.

A run's value is its best checkpoint's (``checkpoint="best"``) or its last one's
(``"last"``), read from the LoggedModels' linked metrics, not from the run's latest
logged value (which is what ``mlflow.search_runs`` sorts by). Only READY checkpoints
count: a half-uploaded one is never averaged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from mlflow_ema.errors import SelectionError
from mlflow_ema.tags import TAG_ALL_FINITE, TAG_INIT_FINGERPRINT, TAG_KIND, TAG_MODEL_NAME, TAG_STEP


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One checkpoint LoggedModel and the metric value it is ranked by."""

    run_id: str
    run_name: str
    model_id: str
    name: str
    kind: str
    step: int
    value: float | None
    artifact_location: str
    init_fingerprint: str | None
    all_finite: bool
    model_name: str | None = None  # its model's name in the run (mlflow_ema.model_name; None before 0.4)

    @property
    def label(self) -> str:
        return f"run {self.run_name or self.run_id} ({self.run_id[:8]}) {self.name}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Selection:
    candidates: list[Candidate]
    warnings: list[str]


def _metric_value(model: Any, metric: str, step: int) -> float | None:
    values = [(m.step != step, m.value) for m in model.metrics or [] if m.key == metric]
    values = [v for v in sorted(values) if not math.isnan(v[1])]
    return values[0][1] if values else None


DEFAULT_EXPERIMENT_ID = "0"  # MLflow's "Default" experiment, where runs go when none is set
_DEFAULT_VARIABLES = ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")


def default_experiments() -> tuple[str, ...]:
    """The experiments to select from when none is named: ``$MLFLOW_EXPERIMENT_NAME``, else
    ``$MLFLOW_EXPERIMENT_ID``, else the Default experiment: where MLflow (and so autolog) logs
    runs when the script set no experiment."""
    import os

    for variable in _DEFAULT_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value:
            return (value,)
    return (DEFAULT_EXPERIMENT_ID,)


def is_soup_run(run: Any) -> bool:
    """A run ``mlflow-ema average`` made (``soup-NAME``, with its strategy and members as
    params): it holds a soup, not checkpoints. Older versions logged it in the sweep's
    experiment."""
    return (run.info.run_name or "").startswith("soup-") and {"strategy", "members"} <= set(run.data.params)


def _experiments(client: Any, experiments: Sequence[str]) -> list[Any]:
    """The named experiments (by name, else by id)."""
    import os

    found = []
    for name in experiments:
        experiment = client.get_experiment_by_name(name)
        if experiment is None and name.isdigit():
            try:
                experiment = client.get_experiment(name)
            except Exception:
                experiment = None
        if experiment is None:
            source = [f" (${v})" for v in _DEFAULT_VARIABLES if os.environ.get(v, "").strip() == name]
            raise SelectionError(f"unknown experiment {name!r}{''.join(source[:1])}")
        found.append(experiment)
    return found


def _checkpoints(client: Any, experiment_ids: list[str], kind: str, run_ids: set[str] | None) -> list[Any]:
    from mlflow.entities import LoggedModelStatus

    found, token = [], None
    while True:
        page = client.search_logged_models(
            experiment_ids=experiment_ids, filter_string=f"tags.`{TAG_KIND}` = '{kind}'", page_token=token
        )
        found += [
            m
            for m in page
            if m.status == LoggedModelStatus.READY and (run_ids is None or m.source_run_id in run_ids)
        ]
        token = page.token
        if not token:
            return found


def _candidate(model: Any, metric: str, run_names: dict[str, str]) -> Candidate:
    step = int(model.tags.get(TAG_STEP, -1))
    return Candidate(
        run_id=model.source_run_id,
        run_name=run_names.get(model.source_run_id, ""),
        model_id=model.model_id,
        name=model.name,
        kind=model.tags.get(TAG_KIND, ""),
        step=step,
        value=_metric_value(model, metric, step),
        artifact_location=model.artifact_location,
        init_fingerprint=model.tags.get(TAG_INIT_FINGERPRINT),
        all_finite=model.tags.get(TAG_ALL_FINITE, "true") == "true",
        model_name=model.tags.get(TAG_MODEL_NAME),
    )


def _rank(candidates: list[Candidate], mode: str, started: dict[str, int] | None = None) -> list[Candidate]:
    """Best first. Ties go to the run started first, then to the later checkpoint: the same
    sweep, run again, ranks the same way (run ids are random)."""
    sign = -1.0 if mode == "max" else 1.0
    started = started or {}
    return sorted(candidates, key=lambda c: (sign * c.value, started.get(c.run_id, 0), c.run_id, -c.step))


def select(
    *,
    experiments: Sequence[str] = (),
    metric: str,
    mode: str = "max",
    kind: str = "ema",
    checkpoint: str = "best",
    top_k: int = 5,
    min_k: int | None = None,
    filter_string: str | None = None,
    statuses: Sequence[str] = ("FINISHED",),
    run_id: str | None = None,
    model_name: str | None = None,
    client: Any = None,
) -> Selection:
    """The checkpoints to average, best first. See the module docstring."""
    from mlflow import MlflowClient

    _check_choice(mode=mode, kind=kind, checkpoint=checkpoint, top_k=top_k, min_k=min_k)
    client = client or MlflowClient()
    if run_id is not None:
        return _select_in_run(
            client,
            run_id,
            metric=metric,
            mode=mode,
            kind=kind,
            checkpoint=checkpoint,
            top_k=top_k,
            min_k=min_k,
            statuses=statuses,
            model_name=model_name,
        )
    found = _experiments(client, tuple(experiments) or default_experiments())
    experiment_ids, experiments = [e.experiment_id for e in found], [e.name for e in found]
    runs = _search_runs(client, experiment_ids, experiments, filter_string, statuses)
    run_names = {r.info.run_id: r.info.run_name for r in runs}
    started = {r.info.run_id: r.info.start_time or 0 for r in runs}
    by_run: dict[str, list[Candidate]] = {}
    for model in _checkpoints(client, experiment_ids, kind, set(run_names)):
        by_run.setdefault(model.source_run_id, []).append(_candidate(model, metric, run_names))
    by_run = _of_one_model(by_run, model_name, run_names)
    notes = []
    if len(by_run) < len(runs):
        notes.append(f"{len(runs) - len(by_run)} of {len(runs)} runs have no READY {kind} checkpoint")
    chosen = [_choose_in_run(candidates, checkpoint, mode) for candidates in by_run.values()]
    best_per_run = [c for c in chosen if c is not None]
    if not best_per_run:
        raise SelectionError(
            f"no run in {', '.join(experiments)} has a {kind} checkpoint with metric {metric!r}"
        )
    ranked = _rank(best_per_run, mode, started)[:top_k]
    return Selection(_enough(ranked, top_k, min_k, "runs", notes), notes)


def _check_choice(*, mode: str, kind: str, checkpoint: str, top_k: int, min_k: int | None) -> None:
    """The one-line error of the first invalid option of :func:`select`, if any."""
    if mode not in ("max", "min"):
        raise SelectionError(f"--mode must be max or min, got {mode!r}")
    if kind not in ("raw", "ema", "posthoc"):
        raise SelectionError(f"--kind must be raw, ema or posthoc, got {kind!r}")
    if checkpoint not in ("best", "last"):
        raise SelectionError(f"--checkpoint must be best or last, got {checkpoint!r}")
    if top_k < 1 or (min_k is not None and not 1 <= min_k <= top_k):
        raise SelectionError("--top-k must be >= 1, and --min-k between 1 and --top-k")


def _search_runs(
    client: Any,
    experiment_ids: list[str],
    experiments: Sequence[str],
    filter_string: str | None,
    statuses: Sequence[str],
) -> list[Any]:
    """The runs of the experiments that match the filter and have one of ``statuses`` (any
    status when empty); refuses none."""
    runs = client.search_runs(experiment_ids, filter_string=filter_string or "", max_results=50000)
    runs = [r for r in runs if not statuses or r.info.status in statuses]
    soups = [r for r in runs if is_soup_run(r)]
    runs = [r for r in runs if not is_soup_run(r)]
    if not runs and soups:
        raise SelectionError(
            f"{', '.join(experiments)} holds only soup runs ({soups[0].info.run_name}, made by mlflow-ema average), "
            "which have no checkpoints to average: select the experiment of the sweep's runs"
        )
    if not runs:
        raise SelectionError(
            f"no {'/'.join(statuses) or ''} runs in {', '.join(experiments)} match the filter"
        )
    return runs


def _choose_in_run(candidates: list[Candidate], checkpoint: str, mode: str) -> Candidate | None:
    """A run's checkpoint for a sweep: its best scored one, or its last one (``"last"``);
    None when that one has no value of the metric."""
    if checkpoint == "last":
        chosen = max(candidates, key=lambda c: c.step)
        return chosen if chosen.value is not None else None
    scored = [c for c in candidates if c.value is not None]
    return _rank(scored, mode)[0] if scored else None


def _select_in_run(
    client: Any,
    run_id: str,
    *,
    metric: str,
    mode: str,
    kind: str,
    checkpoint: str,
    top_k: int,
    min_k: int | None,
    statuses: Sequence[str],
    model_name: str | None,
) -> Selection:
    try:
        run = client.get_run(run_id)
    except Exception:
        raise SelectionError(f"unknown run {run_id!r}") from None
    if run.info.lifecycle_stage == "deleted":
        raise SelectionError(f"run {run_id} is deleted: restore it (mlflow runs restore) to average it")
    if statuses and run.info.status not in statuses:
        raise SelectionError(
            f"run {run_id} is {run.info.status}, not {'/'.join(statuses)} (--status {run.info.status} to take it)"
        )
    if is_soup_run(run):
        raise SelectionError(
            f"run {run_id} is a soup run ({run.info.run_name}, made by mlflow-ema average): it has no checkpoints "
            "to average"
        )
    names = {run_id: run.info.run_name}
    candidates = [
        _candidate(m, metric, names) for m in _checkpoints(client, [run.info.experiment_id], kind, {run_id})
    ]
    candidates = _of_one_model({run_id: candidates}, model_name, names).get(run_id, [])
    if not candidates:
        raise SelectionError(f"run {run_id} has no READY {kind} checkpoint")
    notes: list[str] = []
    if checkpoint == "last":  # the latest k: latest-weight averaging
        ranked = sorted(candidates, key=lambda c: -c.step)[:top_k]
    else:
        scored = [c for c in candidates if c.value is not None]
        if not scored:
            raise SelectionError(f"no {kind} checkpoint of run {run_id} has metric {metric!r}")
        ranked = _rank(scored, mode)[:top_k]
    return Selection(_enough(ranked, top_k, min_k, "checkpoints", notes), notes)


def _of_one_model(
    by_run: dict[str, list[Candidate]], model_name: str | None, run_names: dict[str, str]
) -> dict[str, list[Candidate]]:
    """Each run's checkpoints of one model: ``model_name``'s, or all when each run trains
    one model. A run that trains several needs ``--model``: the error lists their names."""
    if model_name is not None:
        chosen = {r: [c for c in cs if c.model_name == model_name] for r, cs in by_run.items()}
        chosen = {r: cs for r, cs in chosen.items() if cs}
        if not chosen:
            known = sorted({c.model_name for cs in by_run.values() for c in cs if c.model_name})
            raise SelectionError(
                f"no checkpoint of a model named {model_name!r} (models: {', '.join(known) or 'none'})"
            )
        return chosen
    for run_id, candidates in by_run.items():
        names = sorted({c.model_name or "" for c in candidates})
        if len(names) > 1:
            raise SelectionError(
                f"run {run_names.get(run_id) or run_id} ({run_id[:8]}) trains several models ({', '.join(names)}): "
                "choose one with --model NAME"
            )
    return by_run


def _enough(
    ranked: list[Candidate], top_k: int, min_k: int | None, what: str, notes: list[str]
) -> list[Candidate]:
    if len(ranked) < top_k:
        if min_k is None or len(ranked) < min_k:
            raise SelectionError(
                f"only {len(ranked)} {what} qualify, --top-k asks for {top_k} (--min-k to accept fewer)"
            )
        notes.append(
            f"only {len(ranked)} {what} qualify (--top-k {top_k}); going on as --min-k {min_k} allows"
        )
    return ranked
