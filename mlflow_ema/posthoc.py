"""``mlflow-ema posthoc`` as a library call: choose the EMA length after training.

For each target ``sigma_rel``: the coefficients over the run's snapshots taken by the
target step (:func:`mlflow_ema.posthoc_coefficients`), then the weights as the weighted
sum of those snapshots (the streaming sum of :mod:`mlflow_ema.soup`, in fp64, coefficients
possibly negative), scored with ``--eval`` when given. Every snapshot used is downloaded
once and its sha256 verified before any arithmetic. The curve (``sigma_rel -> score``),
the coefficients and the choice are logged to a run in '<experiment>-soups'; with
``register_as`` that run is the registered version's, whose ``mlflow_ema.sources`` lists
each snapshot with its coefficient. ``output`` is written to a temporary folder beside it
and renamed only when every reconstruction is written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mlflow_ema.average_options import AverageOptions, check_choices
from mlflow_ema.checkpoint import save_checkpoint
from mlflow_ema.errors import MlflowEmaError
from mlflow_ema.posthoc_math import check_sigma_rel, posthoc_coefficients
from mlflow_ema.posthoc_options import PosthocOptions
from mlflow_ema.posthoc_report import log_curve
from mlflow_ema.posthoc_snapshots import PosthocSnapshot, find_snapshots
from mlflow_ema.registry import RegisteredSoup, SoupExtras, check_alias, check_model_name, register_soup
from mlflow_ema.soup import Member, average, check_members
from mlflow_ema.trust import trusted_prefixes

Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class Reconstruction:
    """The EMA of ``sigma_rel`` at ``step``: the snapshots taken by then and their coefficients."""

    sigma_rel: float
    step: int
    coefficients: list[tuple[PosthocSnapshot, float]]
    score: float | None = None
    output: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "sigma_rel": self.sigma_rel,
            "step": self.step,
            "score": self.score,
            "coefficients": [
                {"model_id": s.model_id, "step": s.step, "sigma_rel": s.sigma_rel, "coefficient": c}
                for s, c in self.coefficients
            ],
            "output": self.output,
        }


@dataclasses.dataclass
class PosthocResult:
    reconstructions: list[Reconstruction]
    chosen: Reconstruction | None = None  # the best by --eval, or the single target
    run_id: str | None = None  # the run the curve was logged to
    registered: RegisteredSoup | None = None


def check_posthoc(options: PosthocOptions) -> None:
    """Everything about the options that can be checked before any work or write."""
    from mlflow_ema.workflow import check_new_folder

    if not options.run_id:
        raise MlflowEmaError("--run RUN_ID is required: the training run whose snapshots to combine")
    for value in options.sigma_rels:
        check_sigma_rel(value, what="--sigma-rel")
    if len(set(options.sigma_rels)) != len(options.sigma_rels):
        raise MlflowEmaError("--sigma-rel lists a value twice")
    if options.register_as:
        check_model_name(options.register_as)
        if len(options.sigma_rels) > 1 and not options.eval_fn:
            raise MlflowEmaError(
                "--register-as with several --sigma-rel needs --eval to choose one (or give one)"
            )
    if options.alias:
        if not options.register_as:
            raise MlflowEmaError("--alias needs --register-as")
        check_alias(options.alias, option="--alias")
    if options.output:
        check_new_folder(options.output, option="--output")
    check_choices(options)  # --mode, as average checks its choices
    if options.model_kwargs is not None and not isinstance(options.model_kwargs, dict):
        raise MlflowEmaError("--model-kwargs must be a JSON object of keyword arguments")
    trusted_prefixes(options.trust_modules)


def plan_posthoc(options: PosthocOptions) -> list[Reconstruction]:
    """The coefficients of every target, before any download."""
    check_posthoc(options)
    snapshots = find_snapshots(options.run_id, options.model_name)
    step = options.step or max(s.step for s in snapshots)
    _warn_outside(options.sigma_rels, [s.sigma_rel for s in snapshots])
    plans = []
    for sigma_rel in options.sigma_rels:
        with warnings.catch_warnings():  # said once for all the targets, above
            warnings.filterwarnings("ignore", message=".*outside the tracked range")
            coefficients = posthoc_coefficients([s.step for s in snapshots], [s.sigma_rel for s in snapshots],
                                                step, sigma_rel)  # fmt: skip
        used = [(s, float(c)) for s, c in zip(snapshots, coefficients, strict=True) if s.step <= step]
        plans.append(Reconstruction(sigma_rel, step, used))
    return plans


def _warn_outside(targets: Sequence[float], tracked: Sequence[float]) -> None:
    outside = [t for t in targets if not min(tracked) <= t <= max(tracked)]
    if outside:
        warnings.warn(
            f"mlflow-ema: sigma_rel {', '.join(f'{t:g}' for t in outside)} "
            f"{'is' if len(outside) == 1 else 'are'} outside the tracked range [{min(tracked):g}, "
            f"{max(tracked):g}]: the reconstruction is less accurate there",
            stacklevel=3,
        )


def reconstruct_ema(options: PosthocOptions, *, progress: Progress | None = None) -> PosthocResult:
    """Reconstruct, score, log, write and register (see the module docstring)."""
    from mlflow_ema.soup_model import soup_model
    from mlflow_ema.workflow import _download, _scorer

    result = PosthocResult(plan_posthoc(options))
    needed = _needed(result.reconstructions)
    with tempfile.TemporaryDirectory(prefix="mlflow-ema-posthoc-") as tmp:
        soup = None
        if options.register_as or options.eval_fn:  # the module the weights go into, made once
            soup = soup_model(_as_average_options(options), needed[0].candidate, Path(tmp) / "architecture")
        score = _scorer(options.eval_fn, soup.module) if options.eval_fn else None
        members = _download([s.candidate for s in needed], [1.0] * len(needed), Path(tmp), progress)
        by_id = dict(zip((s.model_id for s in needed), members, strict=True))
        manifests = check_members(members)  # every file's sha256, once, before any arithmetic
        best_state = _combine_all(options, result, by_id, score, progress)
        result.chosen = _choose(result.reconstructions, options.mode)
        extras = SoupExtras(log=lambda folder: log_curve(options, result, folder))
        if options.register_as and result.chosen is not None:
            result.registered = _register(options, result, best_state, manifests, needed, soup, extras)
            result.run_id = result.registered.run_id
        else:
            result.run_id = _log_run(options, result, needed[0].candidate.run_id, extras, Path(tmp))
    return result


def _needed(plans: list[Reconstruction]) -> list[PosthocSnapshot]:
    """The snapshots some reconstruction uses (a nonzero coefficient), by model id."""
    used = {s.model_id: s for plan in plans for s, c in plan.coefficients if c != 0.0}
    return list(used.values())


def _combine_all(
    options: PosthocOptions,
    result: PosthocResult,
    by_id: dict[str, Member],
    score: Callable[[dict], float] | None,
    progress: Progress | None,
) -> dict[str, torch.Tensor] | None:
    """Every reconstruction, scored and written (into a temporary folder renamed to
    ``output`` at the end); returns the state dict of the one to register."""
    staging = _staging_folder(options.output) if options.output else None
    keep: dict[str, torch.Tensor] | None = None  # the state to register: the first best, as _choose picks
    kept_score: float | None = None
    try:
        for i, plan in enumerate(result.reconstructions):
            members = [
                dataclasses.replace(by_id[s.model_id], weight=c) for s, c in plan.coefficients if c != 0.0
            ]
            state, manifests = average(members, accumulate=torch.float64, verify=False, signed=True)
            plan.score = score(state) if score is not None else None
            if staging is not None:
                folder = (
                    staging if len(result.reconstructions) == 1 else staging / f"sigma_rel-{plan.sigma_rel}"
                )
                _save(folder, state, plan, manifests[0].init_fingerprint, options)
                plan.output = str(Path(options.output) / folder.relative_to(staging))
            if options.register_as and (keep is None or _better(plan.score, kept_score, options.mode)):
                keep, kept_score = state, plan.score
            if progress:
                progress("reconstructing", i + 1, len(result.reconstructions))
        if staging is not None:
            os.rename(staging, options.output)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return keep


def _staging_folder(output: str) -> Path:
    target = Path(output).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))


def _save(
    folder: Path, state: dict, plan: Reconstruction, fingerprint: str | None, options: PosthocOptions
) -> None:
    metadata = {"strategy": "posthoc", "sigma_rel": plan.sigma_rel, "step": plan.step,
                "sources": [{"model_id": s.model_id, "sigma_rel": s.sigma_rel, "step": s.step, "coefficient": c}
                            for s, c in plan.coefficients]}  # fmt: skip
    if folder.exists():  # the staging folder itself (one target): mkdtemp made it empty
        folder.rmdir()
    save_checkpoint(folder, state, kind="soup", init_fingerprint=fingerprint, metadata=metadata,
                    max_shard_size=options.max_shard_size)  # fmt: skip


def _better(value: float | None, best: float | None, mode: str) -> bool:
    if value is None or best is None:
        return False
    return value > best if mode == "max" else value < best


def _choose(plans: list[Reconstruction], mode: str) -> Reconstruction | None:
    """The best scored reconstruction, or the only one."""
    if len(plans) == 1:
        return plans[0]
    scored = [p for p in plans if p.score is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda p: p.score)


def _as_average_options(options: PosthocOptions) -> AverageOptions:
    """What :func:`mlflow_ema.soup_model.soup_model` reads, from the posthoc options."""
    return AverageOptions(run_id=options.run_id, eval_fn=options.eval_fn, register_as=options.register_as,
                          model_factory=options.model_factory, model_kwargs=options.model_kwargs,
                          trust_modules=tuple(options.trust_modules))  # fmt: skip


def _register(
    options: PosthocOptions,
    result: PosthocResult,
    state: dict[str, torch.Tensor],
    manifests: list[Any],
    needed: list[PosthocSnapshot],
    soup: Any,
    extras: SoupExtras,
) -> RegisteredSoup:
    """The chosen reconstruction as a version of ``register_as``, its snapshots and
    coefficients in ``mlflow_ema.sources``, its ``sigma_rel`` as a tag."""
    import mlflow

    from mlflow_ema.registry import soup_experiment_id
    from mlflow_ema.tags import TAG_SIGMA_REL

    chosen = result.chosen
    manifest_of = {s.model_id: m for s, m in zip(needed, manifests, strict=True)}
    members = [(s.candidate, c, manifest_of[s.model_id]) for s, c in chosen.coefficients if c != 0.0]
    extras.sources = [
        {"sigma_rel": s.sigma_rel, "coefficient": c} for s, c in chosen.coefficients if c != 0.0
    ]
    extras.version_tags = {TAG_SIGMA_REL: str(chosen.sigma_rel)}
    experiment = mlflow.MlflowClient().get_run(options.run_id).info.experiment_id
    params = {"run_id": options.run_id, "model": options.model_name, "step": chosen.step,
              "sigma_rel": chosen.sigma_rel, "sigma_rels": list(options.sigma_rels), "eval": options.eval_fn}  # fmt: skip
    return register_soup(state, members, model=soup, name=options.register_as, alias=options.alias,
                         experiment_id=soup_experiment_id(experiment), strategy="posthoc", metric=options.metric,
                         params=params, soup_value=chosen.score, max_shard_size=options.max_shard_size,
                         extras=extras)  # fmt: skip


def _log_run(
    options: PosthocOptions, result: PosthocResult, run_id: str, extras: SoupExtras, tmp: Path
) -> str:
    """A run of its own for the curve when nothing is registered."""
    import mlflow

    from mlflow_ema.registry import soup_experiment_id

    client = mlflow.MlflowClient()
    training = client.get_run(run_id)
    experiment = soup_experiment_id(training.info.experiment_id)
    with mlflow.start_run(experiment_id=experiment, run_name=f"posthoc-{training.info.run_name}") as run:
        mlflow.log_params({"run_id": run_id, "model": str(options.model_name), "step": result.reconstructions[0].step,
                           "sigma_rels": ",".join(map(str, options.sigma_rels)), "eval": str(options.eval_fn)})  # fmt: skip
        if result.chosen is not None and result.chosen.score is not None:
            mlflow.log_metric(options.metric, result.chosen.score)
        folder = tmp / "report"
        folder.mkdir()
        extras.log(folder)
    return run.info.run_id
