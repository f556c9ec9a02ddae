"""``mlflow-ema average`` as a library call: select, download, average, evaluate, register.

Every step that can fail on bad input runs before anything is written to MLflow: the
registered-model name is checked first, the members are checked against each other before
any arithmetic and their sha256 verified before the average is used, and the model version
is created last.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mlflow_ema.architecture import load_weights
from mlflow_ema.average_options import AverageOptions, check_choices, recorded_params, selection_kwargs
from mlflow_ema.checkpoint import parse_size, read_manifest, save_checkpoint
from mlflow_ema.errors import MlflowEmaError
from mlflow_ema.registry import (
    RegisteredSoup,
    check_alias,
    check_model_name,
    register_soup,
    soup_experiment_id,
)
from mlflow_ema.selection import Candidate, Selection, select
from mlflow_ema.soup import AveragingError, Member, average_checkpoints, greedy_soup, normalized_weights
from mlflow_ema.soup_model import SoupModel, soup_model
from mlflow_ema.stores import local_artifact_dir
from mlflow_ema.trust import resolve_callable, trusted_prefixes

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclasses.dataclass
class AverageResult:
    selection: Selection
    members: list[tuple[Candidate, float]] = dataclasses.field(default_factory=list)  # kept, with weights
    rejected: list[tuple[Candidate, float]] = dataclasses.field(
        default_factory=list
    )  # greedy: (member, score)
    soup_value: float | None = None
    registered: RegisteredSoup | None = None
    output: str | None = None


def check_options(options: AverageOptions) -> None:
    """Everything about the options that can be checked before any work or write."""
    if options.register_as:
        check_model_name(options.register_as)
    if options.alias:
        if not options.register_as:
            raise MlflowEmaError("--alias needs --register-as")
        check_alias(options.alias, option="--alias")
    if options.soup_experiment is not None:
        if not options.register_as:
            raise MlflowEmaError("--soup-experiment needs --register-as (it is where the soup run goes)")
        if not options.soup_experiment.strip():
            raise MlflowEmaError("--soup-experiment must name an experiment")
    if options.output:
        check_new_folder(options.output, option="--output")
    if options.model_kwargs is not None and not isinstance(options.model_kwargs, dict):
        raise MlflowEmaError("--model-kwargs must be a JSON object of keyword arguments")
    trusted_prefixes(options.trust_modules)  # well-formed
    check_choices(options)  # --strategy, --dtype, --accumulate, --mode, --kind, --checkpoint
    if options.strategy == "greedy" and not options.eval_fn:
        raise MlflowEmaError("--strategy greedy needs --eval module:function to score each trial soup")
    try:
        parse_size(options.max_shard_size)
    except ValueError as e:
        raise MlflowEmaError(str(e).replace("max_shard_size", "--max-shard-size", 1)) from None


def check_new_folder(path: str | os.PathLike, *, option: str) -> None:
    """``path`` does not exist yet, and the nearest folder above it that does is writable."""
    target = Path(path)
    if target.exists() or target.is_symlink():
        raise MlflowEmaError(f"{option} {target} already exists: give a new folder (nothing is overwritten)")
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise MlflowEmaError(f"{option} {target}: cannot create it, {parent} is not a writable folder")


def plan(options: AverageOptions) -> Selection:
    """The selection alone (``--dry-run``), after the checks that need no download."""
    check_options(options)
    return select(**selection_kwargs(options), top_k=options.top_k, min_k=options.min_k)


def average_runs(
    options: AverageOptions,
    *,
    selection: Selection | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> AverageResult:
    """Average the selected checkpoints and, with ``register_as``, register the result.

    The module the weights go into (:mod:`mlflow_ema.soup_model`: the run's exported
    program, or a factory's module) is made once, before the checkpoints are downloaded,
    when registering, scoring (``eval_fn``) or ``update_bn`` needs it."""
    if not options.register_as and not options.output:
        raise MlflowEmaError("nothing to produce: give --register-as NAME and/or --output DIR")
    selection = selection or plan(options)
    candidates = selection.candidates
    weights = _weights(options.weights, candidates)
    result = AverageResult(selection)
    with tempfile.TemporaryDirectory(prefix="mlflow-ema-average-") as tmp:
        soup = (
            soup_model(options, candidates[0], Path(tmp) / "architecture")
            if options.register_as or options.eval_fn or options.update_bn
            else None
        )
        model = soup.module if soup else None
        score = _scorer(options.eval_fn, model) if options.eval_fn else None
        loader = resolve_callable(options.update_bn) if options.update_bn else None
        members = _download(candidates, weights, Path(tmp), progress)
        by_path = {m.path: c for m, c in zip(members, candidates, strict=True)}
        state, used, manifests = _combine(options, members, score, result, by_path, progress)
        if loader is not None:
            state = _update_bn(state, loader, model)
        if score is not None and result.soup_value is None:
            result.soup_value = score(state)
        final_weights = normalized_weights([m.weight for m in used])
        result.members = [(by_path[m.path], w) for m, w in zip(used, final_weights, strict=True)]
        if options.output:
            save_checkpoint(Path(options.output), state, kind="soup", init_fingerprint=manifests[0].init_fingerprint,
                            metadata={"strategy": options.strategy, "members": [c.model_id for c, _ in result.members]},
                            max_shard_size=options.max_shard_size)  # fmt: skip
            result.output = options.output
        if options.register_as:
            result.registered = _register(options, result, state, manifests, soup)
    return result


def _download(
    candidates: list[Candidate],
    weights: list[float],
    tmp: Path,
    progress: Callable[[str, int, int], None] | None,
) -> list[Member]:
    """The members as local folders. A store on this machine is read in place (never
    written: the averaging checks every file's size and sha256); others are downloaded."""
    import mlflow

    members = []
    for i, candidate in enumerate(candidates):
        local = local_artifact_dir(candidate.artifact_location)
        if local is None or not local.is_dir():
            folder = tmp / f"{i:03d}-{candidate.model_id}"
            folder.mkdir()
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=candidate.artifact_location, dst_path=str(folder)
            )
        members.append(Member(Path(local), weight=weights[i], label=candidate.label))
        if progress:
            progress("downloading", i + 1, len(candidates))
    return members


def _combine(
    options: AverageOptions,
    members: list[Member],
    score: Callable[[dict], float] | None,
    result: AverageResult,
    by_path: dict[Path, Candidate],
    progress: Callable[[str, int, int], None] | None,
) -> tuple[dict, list[Member], list]:
    """The averaged state, the members used and their manifests (uniform or greedy)."""
    kwargs = {
        "accumulate": DTYPES[options.accumulate],
        "dtype": DTYPES[options.dtype] if options.dtype else None,
        "allow_different_init": options.allow_different_init,
    }
    if options.strategy == "greedy":
        kept, state, result.soup_value = greedy_soup(
            members, score, mode=options.mode,
            on_trial=lambda m, v, keep: None if keep else result.rejected.append((by_path[m.path], v)),
            **kwargs,
        )  # fmt: skip
        return state, kept, [read_manifest(m.path) for m in kept]

    def report(done: int, total: int) -> None:
        if progress:
            progress("averaging", done, total)

    normalized_weights([m.weight for m in members])  # the CLI's weights are never negative
    state = average_checkpoints([m.path for m in members], None, [m.weight for m in members],
                                labels=[m.name for m in members], progress=report, **kwargs)  # fmt: skip
    return state, members, [read_manifest(m.path) for m in members]


def _register(
    options: AverageOptions, result: AverageResult, state: dict, manifests: list, soup: SoupModel
) -> RegisteredSoup:
    import mlflow

    members_experiment = mlflow.MlflowClient().get_run(result.members[0][0].run_id).info.experiment_id
    experiment_id = soup_experiment_id(members_experiment, options.soup_experiment)
    return register_soup(
        state,
        [(c, w, m) for (c, w), m in zip(result.members, manifests, strict=True)],
        model=soup, name=options.register_as, alias=options.alias, experiment_id=experiment_id,
        strategy=options.strategy, metric=options.metric, soup_value=result.soup_value,
        params=_params(options, result), max_shard_size=options.max_shard_size,
    )  # fmt: skip


def _weights(spec: str, candidates: list[Candidate]) -> list[float]:
    if spec == "uniform":
        return [1.0] * len(candidates)
    if spec == "metric":
        values = [c.value for c in candidates]
        if any(v is None or v <= 0 for v in values):
            raise AveragingError("--weights metric needs a positive metric value for every member")
        return normalized_weights(values)
    try:
        values = [float(x) for x in spec.split(",")]
    except ValueError:
        raise AveragingError(
            f"--weights must be uniform, metric or a comma-separated list, got {spec!r}"
        ) from None
    if len(values) != len(candidates):
        raise AveragingError(
            f"--weights lists {len(values)} weights for {len(candidates)} selected checkpoints"
        )
    return normalized_weights(values)


def _scorer(spec: str, model: torch.nn.Module) -> Callable[[dict], float]:
    """``score(state)``: the user's function on ``model`` holding ``state`` (one module, reloaded)."""
    evaluate = resolve_callable(spec)

    def score(state: dict) -> float:
        load_weights(model, state, what="the averaged weights")
        model.eval()
        with torch.no_grad():
            value = evaluate(model)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise MlflowEmaError(f"--eval {spec} must return a number, got {type(value).__name__}") from None
        if value != value:
            raise MlflowEmaError(f"--eval {spec} returned NaN")
        return value

    return score


def _update_bn(state: dict, loader: Callable[[], Any], model: torch.nn.Module) -> dict:
    """Recompute BatchNorm statistics on the user's data (``torch.optim.swa_utils.update_bn``)."""
    from torch.optim.swa_utils import update_bn

    load_weights(model, state, what="the averaged weights")
    update_bn(loader(), model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _params(options: AverageOptions, result: AverageResult) -> dict[str, Any]:
    """The soup run's params: the options that record one (see ``average_options``), and
    the weights used."""
    return {**recorded_params(options), "weights": [round(w, 6) for _, w in result.members]}
