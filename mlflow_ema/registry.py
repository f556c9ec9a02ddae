"""Registering an averaged model as a new model version, and promoting versions by
moving aliases (MLflow's way since registry stages were deprecated).

:func:`register_soup` records the averaging as an MLflow run: params (the selection,
strategy and weights), metrics (each member's value and, when evaluated, the soup's),
artifacts (``soup/``: the averaged checkpoint, ``model.safetensors`` or shards above
``max_shard_size``, and ``manifest.json``; ``soup.png``, the members against the soup), and a
pytorch-flavor model built from the architecture the members' run recorded. Only then is the
model registered, with the version tags ``mlflow_ema.sources`` (JSON: per member ``run_id``,
``model_id``, ``step``, ``value``, ``weight``, ``sha256``), ``mlflow_ema.strategy`` and
``mlflow_ema.sha256`` (of the averaged weights); every sha256 is
:func:`~mlflow_ema.checkpoint.weights_digest`, the file's for ``model.safetensors``, one over
the shards' for sharded weights. A failure before that registers nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mlflow_ema._version import __version__
from mlflow_ema.architecture import build_model
from mlflow_ema.checkpoint import DEFAULT_MAX_SHARD_SIZE, Manifest, save_checkpoint, weights_digest
from mlflow_ema.errors import IncompatibleModelError, MlflowEmaError
from mlflow_ema.selection import Candidate

TAG_SOURCES = "mlflow_ema.sources"
TAG_STRATEGY = "mlflow_ema.strategy"
TAG_SHA256 = "mlflow_ema.sha256"
TAG_PROMOTED_TO = "mlflow_ema.promoted_to"
TAG_PROMOTED_FROM = "mlflow_ema.promoted_from"
TAG_PROMOTED_AT = "mlflow_ema.promoted_at"
TAG_REPLACED = "mlflow_ema.replaced_version"


class RegistryError(MlflowEmaError):
    """A registered model, version or alias is missing or invalid."""


@dataclasses.dataclass(frozen=True)
class RegisteredSoup:
    run_id: str
    model_uri: str
    name: str
    version: str
    alias: str | None
    sha256: str


def check_model_name(name: str) -> None:
    """Refuse a registered-model name MLflow would refuse, before any work is done."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as e:
        raise RegistryError(f"invalid registered-model name {name!r}: {e.message}") from None


def register_soup(
    state_dict: Mapping[str, torch.Tensor],
    members: Sequence[tuple[Candidate, float, Manifest]],
    *,
    name: str,
    alias: str | None = None,
    experiment_id: str,
    strategy: str,
    metric: str,
    params: Mapping[str, Any],
    soup_value: float | None = None,
    model_factory: str | None = None,
    model_kwargs: dict | None = None,
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
) -> RegisteredSoup:
    """Log the soup as a run and register it as a new version of ``name``. See the module
    docstring; ``members`` are (candidate, normalized weight, manifest), best first."""
    import mlflow
    from mlflow import MlflowClient

    check_model_name(name)
    client = MlflowClient()
    first = members[0][0]
    model = build_model(
        client.get_run(first.run_id).data.tags, model_factory=model_factory, model_kwargs=model_kwargs
    )
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise IncompatibleModelError(
            f"the averaged weights do not fit the recorded model: {str(e).splitlines()[0]}"
        ) from None
    fingerprints = {m.init_fingerprint for _, _, m in members}
    sources = [
        {"run_id": c.run_id, "model_id": c.model_id, "step": c.step, "value": c.value, "weight": w,
         "sha256": weights_digest(m)}
        for c, w, m in members
    ]  # fmt: skip
    with (
        mlflow.start_run(experiment_id=experiment_id, run_name=f"soup-{name}") as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        mlflow.log_params(
            {**{k: _param(v) for k, v in params.items()}, "strategy": strategy, "members": len(members)}
        )
        mlflow.log_metrics(
            {f"member/{i}/{metric}": c.value for i, (c, _, _) in enumerate(members) if c.value is not None}
        )
        if soup_value is not None:
            mlflow.log_metric(metric, soup_value)
        manifest = save_checkpoint(
            Path(tmp) / "soup",
            state_dict,
            kind="soup",
            init_fingerprint=fingerprints.pop() if len(fingerprints) == 1 else None,
            metadata={"strategy": strategy, "sources": sources},
            max_shard_size=max_shard_size,
        )
        mlflow.log_artifacts(str(Path(tmp) / "soup"), artifact_path="soup")
        chart = _chart(members, metric, soup_value, Path(tmp) / "soup.png")
        mlflow.log_artifact(str(chart))
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pickle",  # loads back as the user's module, not a GraphModule
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
        sha256 = weights_digest(manifest)
        tags = {TAG_SOURCES: json.dumps(sources), TAG_STRATEGY: strategy, TAG_SHA256: sha256,
                "mlflow_ema.version": __version__}  # fmt: skip
        version = mlflow.register_model(info.model_uri, name, tags=tags)
        if alias:
            try:
                client.set_registered_model_alias(name, alias, version.version)
            except Exception:
                client.delete_model_version(name, version.version)  # no half-made version
                raise
    return RegisteredSoup(run.info.run_id, info.model_uri, name, str(version.version), alias, sha256)


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]


def _chart(
    members: Sequence[tuple[Candidate, float, Manifest]], metric: str, soup_value: float | None, path: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{c.run_name or c.run_id[:8]}\nstep {c.step}" for c, _, _ in members]
    values = [c.value if c.value is not None else float("nan") for c, _, _ in members]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(members) + 2), 3.5))
    ax.bar(range(len(members)), values, color="#8aa4c8", label="members")
    if soup_value is not None:
        ax.axhline(soup_value, color="#c0392b", linewidth=2, label=f"soup {soup_value:.4f}")
    ax.set_xticks(range(len(members)), labels, fontsize=7)
    ax.set_ylabel(metric)
    known = [v for v in [*values, soup_value] if v is not None and v == v]
    if known:
        spread = max(known) - min(known) or abs(max(known)) * 0.01 or 0.01
        ax.set_ylim(min(known) - spread, max(known) + spread)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("members and the soup")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclasses.dataclass(frozen=True)
class Promotion:
    name: str
    version: str
    alias: str
    promoted: bool
    reason: str
    replaced: str | None = None
    copied_to: str | None = None


def promote(
    name: str,
    *,
    to: str,
    version: str | None = None,
    from_alias: str | None = None,
    if_better: str | None = None,
    mode: str = "max",
    copy_to: str | None = None,
) -> Promotion:
    """Point alias ``to`` of ``name`` at ``version`` (or at what ``from_alias`` points to),
    optionally only when its recorded ``if_better`` metric beats the current holder's.
    Records what was promoted, from where and when as version tags; ``copy_to`` also
    copies the version to another registered model and sets the alias there."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if (version is None) == (from_alias is None):
        raise RegistryError("give exactly one of --version and --from-alias")
    if mode not in ("max", "min"):
        raise RegistryError(f"--mode must be max or min, got {mode!r}")
    check_model_name(name)
    client = MlflowClient()
    try:
        candidate = (
            client.get_model_version_by_alias(name, from_alias)
            if from_alias
            else client.get_model_version(name, version)
        )
    except MlflowException as e:
        what = f"alias {from_alias!r}" if from_alias else f"version {version}"
        raise RegistryError(f"registered model {name!r} has no {what} ({e.error_code})") from None
    try:
        holder = client.get_model_version_by_alias(name, to)
    except MlflowException:
        holder = None
    source = f"alias {from_alias}" if from_alias else f"version {candidate.version}"
    if holder is not None and holder.version == candidate.version:
        return Promotion(
            name, candidate.version, to, False, f"{to} already points to version {candidate.version}"
        )
    if if_better and holder is not None:
        new, old = _recorded(client, candidate, if_better), _recorded(client, holder, if_better)
        if new is None:
            raise RegistryError(f"version {candidate.version} of {name!r} has no recorded {if_better!r}")
        if old is not None and not (new > old if mode == "max" else new < old):
            return Promotion(name, candidate.version, to, False,
                             f"{if_better} {new:.6g} does not beat version {holder.version}'s {old:.6g}")  # fmt: skip
    client.set_registered_model_alias(name, to, candidate.version)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for key, value in {TAG_PROMOTED_TO: to, TAG_PROMOTED_FROM: source, TAG_PROMOTED_AT: stamp,
                       TAG_REPLACED: holder.version if holder else ""}.items():  # fmt: skip
        client.set_model_version_tag(name, candidate.version, key, value)
    copied = None
    if copy_to:
        check_model_name(copy_to)
        try:
            client.get_registered_model(copy_to)
        except MlflowException:
            client.create_registered_model(copy_to)
        copy = client.copy_model_version(f"models:/{name}/{candidate.version}", copy_to)
        client.set_registered_model_alias(copy_to, to, copy.version)
        copied = f"{copy_to} version {copy.version}"
    reason = f"{to} -> version {candidate.version} (was {holder.version if holder else 'unset'})"
    return Promotion(name, candidate.version, to, True, reason, holder.version if holder else None, copied)


def _recorded(client: Any, version: Any, metric: str) -> float | None:
    """The metric a version's source run recorded (for a soup: its evaluation)."""
    if not version.run_id:
        return None
    return client.get_run(version.run_id).data.metrics.get(metric)
