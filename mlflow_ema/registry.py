"""Registering an averaged model as a new model version, and promoting versions by
moving aliases (MLflow's way since registry stages were deprecated).

:func:`register_soup` records the averaging as an MLflow run (in the soups' own experiment,
:func:`soup_experiment_id`, never among a sweep's runs): params (the selection,
strategy and weights), metrics (each member's value and, when evaluated, the soup's),
artifacts (``soup/``: the averaged checkpoint, ``model.safetensors`` or shards above
``max_shard_size``, and ``manifest.json``; ``soup.png``, the members against the soup), and a
pytorch-flavor model holding the soup's weights (:mod:`mlflow_ema.soup_model`: by default
MLflow's pt2 format, with a signature and an input example, no pickle). Only then is the
model registered, with the version tags ``mlflow_ema.sources`` (JSON: per member ``run_id``,
``model_id``, ``step``, ``value``, ``weight``, ``sha256``), ``mlflow_ema.strategy``,
``mlflow_ema.scored`` (``"false"`` without a soup value: :func:`promote` with ``if_better``
refuses it) and ``mlflow_ema.sha256`` (of the averaged weights); every sha256 is
:func:`~mlflow_ema.checkpoint.weights_digest`, the file's for ``model.safetensors``, one over
the shards' for sharded weights. A failure before that registers nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mlflow_ema._version import __version__
from mlflow_ema.architecture import load_weights
from mlflow_ema.checkpoint import DEFAULT_MAX_SHARD_SIZE, Manifest, save_checkpoint, weights_digest
from mlflow_ema.errors import RegistryError
from mlflow_ema.programs import by_reference
from mlflow_ema.selection import Candidate
from mlflow_ema.soup_model import SoupModel, log_soup_model
from mlflow_ema.stores import local_artifact_dir
from mlflow_ema.tags import (
    TAG_INCOMPLETE,
    TAG_PROMOTED_AT,
    TAG_PROMOTED_FROM,
    TAG_PROMOTED_TO,
    TAG_REPLACED,
    TAG_SCORED,
    TAG_SHA256,
    TAG_SOURCES,
    TAG_STRATEGY,
    TAG_VERSION,
)


@dataclasses.dataclass(frozen=True)
class RegisteredSoup:
    run_id: str
    model_uri: str
    name: str
    version: str
    alias: str | None
    sha256: str


def check_model_name(name: str, *, option: str = "registered-model name") -> None:
    """Refuse a registered-model name MLflow would refuse, before any work is done."""
    if not name or not name.strip() or any(c in name for c in "/:"):
        raise RegistryError(f"invalid {option} {name!r}: names may not be empty or contain '/' or ':'")
    _mlflow_check(("_validate_model_name",), name, option)


def check_alias(alias: str, *, option: str = "--alias", reserved: bool = True) -> None:
    """Refuse an alias MLflow refuses (the rules its registry documents: letters, digits,
    ``_`` and ``-``, at most 255 characters; ``latest`` and ``v<digits>`` reserved), before
    any work is done."""
    if not _ALIAS.fullmatch(alias or "") or len(alias) > 255:
        raise RegistryError(
            f"invalid {option} {alias!r}: aliases may only contain letters, digits, underscores (_) "
            "and dashes (-), at most 255 of them"
        )
    if reserved and (alias.lower() == "latest" or _VERSION_ALIAS.fullmatch(alias)):
        raise RegistryError(
            f"invalid {option} {alias!r}: 'latest' and version aliases (v1, v2...) are reserved"
        )


def check_metric_name(metric: str, *, option: str) -> None:
    if not metric or not metric.strip():
        raise RegistryError(f"invalid {option} {metric!r}: the metric name is empty")
    _mlflow_check(("_validate_metric_name",), metric, option)


_ALIAS = re.compile(r"[\w\-]+")
_VERSION_ALIAS = re.compile(r"[vV]\d+")


def _mlflow_check(validators: tuple[str, ...], value: str, option: str) -> None:
    """MLflow's own check of ``value`` as well, where this MLflow version has it: those
    validators are private and renamed between releases (3.18 renamed the alias ones)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    for name in validators:
        check = getattr(validation, name, None)
        if check is None:
            continue
        try:
            check(value)
        except MlflowException as e:
            raise RegistryError(f"invalid {option} {value!r}: {e.message}") from None
        return


SOUP_EXPERIMENT_SUFFIX = "-soups"


def soup_experiment_id(members_experiment_id: str, name: str | None = None) -> str:
    """The experiment of a soup run, created if missing: ``name``, else '<the members'
    experiment>-soups' (``Default-soups`` for the Default experiment), so that soup runs
    never mix with a sweep's runs. In a local store its artifacts go next to the members'
    experiment's (not under the working directory, MLflow's default)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    members = client.get_experiment(members_experiment_id)
    name = name or f"{members.name}{SOUP_EXPERIMENT_SUFFIX}"
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_soup_artifact_location(members, name))
        except MlflowException as e:  # another command may have created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise RegistryError(f"cannot create the soup experiment {name!r}: {_first_line(e)}") from None
    if experiment.lifecycle_stage == "deleted":
        raise RegistryError(
            f"the soup experiment {name!r} is deleted: restore it (mlflow experiments restore) or give "
            "--soup-experiment NAME"
        )
    return experiment.experiment_id


def _soup_artifact_location(members: Any, name: str) -> str | None:
    """``<the members' artifact root>/soups/<name>`` for a database store whose artifacts are
    local (MLflow would use ``./mlruns`` under the working directory); else None: a server's,
    or a file store's, own default."""
    from urllib.parse import quote, urlparse

    import mlflow

    database = urlparse(mlflow.get_tracking_uri()).scheme.split("+")[0] in (
        "sqlite",
        "postgresql",
        "mysql",
        "mssql",
    )
    location = (members.artifact_location or "").rstrip("/")
    if not database or urlparse(location).scheme not in ("file", "") or "/" not in location:
        return None
    return f"{location.rsplit('/', 1)[0]}/soups/{quote(name, safe='')}"


@dataclasses.dataclass
class SoupExtras:
    """What a registration adds beyond :func:`register_soup`'s own (``mlflow-ema posthoc``):
    fields per member in ``mlflow_ema.sources``, tags on the version, and ``log(tmp)``,
    called in the soup run instead of logging ``soup.png``."""

    sources: Sequence[dict[str, Any]] | None = None
    version_tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    log: Callable[[Path], None] | None = None


def register_soup(
    state_dict: Mapping[str, torch.Tensor],
    members: Sequence[tuple[Candidate, float, Manifest]],
    *,
    model: SoupModel,
    name: str,
    alias: str | None = None,
    experiment_id: str,
    strategy: str,
    metric: str,
    params: Mapping[str, Any],
    soup_value: float | None = None,
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
    extras: SoupExtras | None = None,
) -> RegisteredSoup:
    """Log the soup as a run and register it as a new version of ``name``. See the module
    docstring; ``members`` are (candidate, normalized weight, manifest), best first, and
    ``model`` the module of their architecture that the weights are loaded into, and how
    it is written.

    A failure midway leaves nothing half-made: the soup run is marked
    ``mlflow_ema.incomplete=true`` and deleted with its artifacts and models, and the
    version (and the registered model, if this call created it) is deleted; the error says so."""
    import mlflow
    from mlflow import MlflowClient

    check_model_name(name)
    if alias:
        check_alias(alias)
    # an exported program takes the soup's tensors, not a copy: nothing writes to them from here on
    with by_reference(model.module):
        load_weights(model.module, state_dict, what="the averaged weights")
    existed = _registered_model_exists(name)
    made: dict[str, Any] = {}  # what exists so far, for the clean-up
    try:
        with (
            mlflow.start_run(experiment_id=experiment_id, run_name=f"soup-{name}") as run,
            tempfile.TemporaryDirectory() as tmp,
        ):
            made["run_id"] = run.info.run_id
            extras = extras or SoupExtras()
            manifest, sources = _log_soup(Path(tmp), state_dict, members, strategy=strategy, metric=metric,
                                          params=params, soup_value=soup_value, max_shard_size=max_shard_size,
                                          extras=extras)  # fmt: skip
            requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
            info = log_soup_model(model, requirements)
            sha256 = weights_digest(manifest)
            tags = {TAG_SOURCES: json.dumps(sources), TAG_STRATEGY: strategy, TAG_SHA256: sha256,
                    TAG_VERSION: __version__, TAG_SCORED: "false" if soup_value is None else "true",
                    **extras.version_tags}  # fmt: skip
            version = mlflow.register_model(info.model_uri, name, tags=tags)
            made["version"] = version.version
            if alias:
                MlflowClient().set_registered_model_alias(name, alias, version.version)
    except BaseException as e:
        if mlflow.active_run() is not None and mlflow.active_run().info.run_id == made.get("run_id"):
            mlflow.end_run("FAILED")
        cleaned = _clean_up(made, name, created_model=not existed)
        if not isinstance(e, Exception):
            raise
        raise RegistryError(f"registering the soup failed ({_first_line(e)}); {cleaned}") from e
    return RegisteredSoup(run.info.run_id, info.model_uri, name, str(version.version), alias, sha256)


def _log_soup(
    tmp: Path,
    state_dict: Mapping[str, torch.Tensor],
    members: Sequence[tuple[Candidate, float, Manifest]],
    *,
    strategy: str,
    metric: str,
    params: Mapping[str, Any],
    soup_value: float | None,
    max_shard_size: int | str | None,
    extras: SoupExtras,
) -> tuple[Manifest, list[dict[str, Any]]]:
    """The soup run's params, metrics and artifacts (``soup/``, ``soup.png`` or what
    ``extras.log`` logs instead), in the active run; returns the soup's manifest and the
    members' sources."""
    import mlflow

    sources = [
        {"run_id": c.run_id, "model_id": c.model_id, "step": c.step, "value": c.value, "weight": w,
         "sha256": weights_digest(m), **(extras.sources[i] if extras.sources else {})}
        for i, (c, w, m) in enumerate(members)
    ]  # fmt: skip
    mlflow.log_params(
        {**{k: _param(v) for k, v in params.items()}, "strategy": strategy, "members": len(members)}
    )
    mlflow.log_metrics(
        {f"member/{i}/{metric}": c.value for i, (c, _, _) in enumerate(members) if c.value is not None}
    )
    if soup_value is not None:
        mlflow.log_metric(metric, soup_value)
    fingerprints = {m.init_fingerprint for _, _, m in members}
    store = _local_artifact_dir()
    # A local store gets the checkpoint written in place (staged, then renamed: never half-written),
    # not written to tmp and copied: the weights are written once, not twice.
    manifest = save_checkpoint((store or tmp) / "soup", state_dict, kind="soup",
                               init_fingerprint=fingerprints.pop() if len(fingerprints) == 1 else None,
                               metadata={"strategy": strategy, "sources": sources}, max_shard_size=max_shard_size)  # fmt: skip
    if store is None:
        mlflow.log_artifacts(str(tmp / "soup"), artifact_path="soup")
    if extras.log is not None:
        extras.log(tmp)
    else:
        mlflow.log_artifact(str(_chart(members, metric, soup_value, tmp / "soup.png")))
    return manifest, sources


def _local_artifact_dir() -> Path | None:
    """The active run's artifact folder when MLflow keeps it on this machine, else None."""
    import mlflow

    return local_artifact_dir(mlflow.get_artifact_uri())


def _registered_model_exists(name: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _clean_up(made: Mapping[str, Any], name: str, *, created_model: bool) -> str:
    """Remove what a failed registration made; returns what was done, for the error."""
    from mlflow import MlflowClient

    client = MlflowClient()
    done, left = [], []
    steps: list[tuple[str, Any]] = []
    if made.get("version") is not None:
        steps.append(
            (f"deleted version {made['version']}", lambda: client.delete_model_version(name, made["version"]))
        )
    if created_model:
        steps.append((f"deleted the new registered model {name!r}", lambda: _delete_if_empty(client, name)))
    run_id = made.get("run_id")
    if run_id:
        steps += [
            ("", lambda: client.set_tag(run_id, TAG_INCOMPLETE, "true")),
            ("", lambda: _delete_run_models(client, run_id)),
            ("", lambda: _delete_run_artifacts(client, run_id)),
            (f"deleted the soup run {run_id} and its artifacts", lambda: client.delete_run(run_id)),
        ]
    for what, step in steps:
        try:
            if step() is not False and what:
                done.append(what)
        except Exception as e:  # the store may be what failed: say what is left
            left.append(f"{what or 'clean-up'} failed: {_first_line(e)}")
    if left and run_id:
        left.append(f"soup run {run_id} is tagged {TAG_INCOMPLETE}=true and is never used")
    summary = "; ".join(done) if done else "nothing had been written"
    if not made.get("version"):
        summary += "; nothing was registered"
    return summary + ("" if not left else " (" + "; ".join(left) + ")")


def _delete_if_empty(client: Any, name: str) -> bool:
    # a failure before register_model never created it: nothing to delete, nothing failed
    if not _registered_model_exists(name) or client.search_model_versions(f"name = '{name}'"):
        return False
    client.delete_registered_model(name)
    return True


def _delete_run_models(client: Any, run_id: str) -> None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    experiment_id = client.get_run(run_id).info.experiment_id
    for logged in client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    ):
        with contextlib.suppress(Exception):  # the soft delete below is what counts
            get_artifact_repository(logged.artifact_location).delete_artifacts()
        client.delete_logged_model(logged.model_id)


def _delete_run_artifacts(client: Any, run_id: str) -> None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    get_artifact_repository(client.get_run(run_id).info.artifact_uri).delete_artifacts()


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "message", None) or error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


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
    title, shown = "members and the soup", "members and the soup"
    if soup_value is None:
        title, shown = (
            "members; the soup was not scored (averaged without --eval)",
            "members (soup not scored)",
        )
        ax.text(0.5, 0.5, "soup not scored\n(averaged without --eval)", transform=ax.transAxes, ha="center",
                va="center", fontsize=11, color="#c0392b", bbox={"facecolor": "white", "alpha": 0.8})  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(shown)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Title": title})
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
    optionally only when its recorded ``if_better`` metric beats the current holder's (a
    version that did not record it is refused). Records what was promoted, from where and
    when as version tags; ``copy_to`` also copies the version to another registered model
    and sets the alias there. Every name is checked before anything is written, and the copy
    is made before the alias moves."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    check_promotion(name, to=to, version=version, from_alias=from_alias, if_better=if_better, mode=mode,
                     copy_to=copy_to)  # fmt: skip
    client = MlflowClient()
    candidate = _version_to_promote(client, name, version, from_alias)
    try:
        holder = client.get_model_version_by_alias(name, to)
    except MlflowException:
        holder = None
    if holder is not None and holder.version == candidate.version:
        return Promotion(
            name, candidate.version, to, False, f"{to} already points to version {candidate.version}"
        )
    if if_better:
        if candidate.tags.get(TAG_SCORED) == "false":
            raise RegistryError(
                f"version {candidate.version} of {name!r} was not scored (averaged without --eval): "
                f"--if-better {if_better} has nothing to compare"
            )
        new = _recorded(client, candidate, if_better)
        if new is None:
            raise RegistryError(
                f"version {candidate.version} of {name!r} has no recorded {if_better!r}: --if-better cannot "
                "compare it (was the soup scored with --eval?)"
            )
        old = None if holder is None else _recorded(client, holder, if_better)
        if old is not None and not (new > old if mode == "max" else new < old):
            return Promotion(name, candidate.version, to, False,
                             f"{if_better} {new:.6g} does not beat version {holder.version}'s {old:.6g}")  # fmt: skip
    copied = _copy_version(client, name, candidate.version, copy_to, to) if copy_to else None
    client.set_registered_model_alias(name, to, candidate.version)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    source = f"alias {from_alias}" if from_alias else f"version {candidate.version}"
    for key, value in {TAG_PROMOTED_TO: to, TAG_PROMOTED_FROM: source, TAG_PROMOTED_AT: stamp,
                       TAG_REPLACED: holder.version if holder else ""}.items():  # fmt: skip
        client.set_model_version_tag(name, candidate.version, key, value)
    reason = f"{to} -> version {candidate.version} (was {holder.version if holder else 'unset'})"
    return Promotion(name, candidate.version, to, True, reason, holder.version if holder else None, copied)


def check_promotion(
    name: str, *, to: str, version: str | None, from_alias: str | None, if_better: str | None, mode: str,
    copy_to: str | None,
) -> None:  # fmt: skip
    """Every input of :func:`promote` that can be checked before a request."""
    if (version is None) == (from_alias is None):
        raise RegistryError("give exactly one of --version and --from-alias")
    if mode not in ("max", "min"):
        raise RegistryError(f"--mode must be max or min, got {mode!r}")
    check_model_name(name)
    check_alias(to, option="--to")
    if from_alias is not None:
        check_alias(from_alias, option="--from-alias", reserved=False)
    if version is not None and not str(version).strip().isdigit():
        raise RegistryError(f"--version must be a version number, got {version!r}")
    if if_better is not None:
        check_metric_name(if_better, option="--if-better metric")
    if copy_to is not None:
        check_model_name(copy_to, option="--copy-to name")
        if copy_to == name:
            raise RegistryError("--copy-to must name another registered model")


def _version_to_promote(client: Any, name: str, version: str | None, from_alias: str | None) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        if from_alias:
            return client.get_model_version_by_alias(name, from_alias)
        return client.get_model_version(name, str(version).strip())
    except MlflowException as e:
        what = f"alias {from_alias!r}" if from_alias else f"version {version}"
        raise RegistryError(f"registered model {name!r} has no {what} ({e.error_code})") from None


def _copy_version(client: Any, name: str, version: str, copy_to: str, alias: str) -> str:
    """Copy a version to registered model ``copy_to`` (created if need be), alias it there."""
    if not _registered_model_exists(copy_to):
        client.create_registered_model(copy_to)
    copy = client.copy_model_version(f"models:/{name}/{version}", copy_to)
    client.set_registered_model_alias(copy_to, alias, copy.version)
    return f"{copy_to} version {copy.version}"


def _recorded(client: Any, version: Any, metric: str) -> float | None:
    """The metric a version's source run recorded (for a soup: its evaluation)."""
    if not version.run_id:
        return None
    return client.get_run(version.run_id).data.metrics.get(metric)
