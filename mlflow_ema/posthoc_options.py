"""The options of ``mlflow-ema posthoc``, declared once as the fields of :class:`PosthocOptions`
(the metadata is :func:`mlflow_ema.average_options.option`'s; ``cli/options.py`` makes the
click options from them). Imports neither torch nor mlflow: ``--help`` reads it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from mlflow_ema.average_options import _MODULE_FUNCTION, json_object, option, size_or_none
from mlflow_ema.errors import MlflowEmaError
from mlflow_ema.sizes import DEFAULT_MAX_SHARD_SIZE

DEFAULT_TARGETS = "0.03,0.05,0.08,0.12,0.2"


def sigma_rel_list(text: Any, flag: str) -> tuple[float, ...]:
    """``--sigma-rel 0.05,0.1``: the values, as floats."""
    values = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        floats = tuple(float(v) for v in values if str(v).strip())
    except ValueError:
        raise MlflowEmaError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not floats:
        raise MlflowEmaError(f"{flag} must name at least one sigma_rel")
    return floats


@dataclasses.dataclass
class PosthocOptions:
    """The options of ``mlflow-ema posthoc`` (see its ``--help``)."""

    run_id: str | None = option(
        None, "--run", metavar="RUN_ID", help="The training run whose snapshots to combine."
    )
    model_name: str | None = option(
        None, "--model", metavar="NAME", help="Which model, in a run that trains several (its mlflow_ema.model_name).",
    )  # fmt: skip
    sigma_rels: Sequence[float] | str = option(
        DEFAULT_TARGETS, "--sigma-rel", metavar="S1,S2,...", convert=sigma_rel_list,
        help="The EMA lengths to reconstruct (relative standard deviation of the averaging profile).",
    )  # fmt: skip
    step: int | None = option(
        None, "--step", metavar="S", at_least=1,
        help="Reconstruct the EMA at this optimizer step (default: the last snapshot's).",
    )  # fmt: skip
    eval_fn: str | None = option(
        None, "--eval", metavar=_MODULE_FUNCTION,
        help="Scores a model (called with the module, returns a float): chooses the best length.",
    )  # fmt: skip
    metric: str = option(
        "ema/val_acc", "--metric", metavar="NAME",
        help="The name the --eval score is logged under (what promote --if-better compares).",
    )  # fmt: skip
    mode: str = option(
        "max", "--mode", choices=("max", "min"), help="Whether a higher --eval score is better."
    )
    output: str | None = option(
        None, "--output", folder=True,
        help="Write the reconstruction(s) to this new folder (several: DIR/sigma_rel-<value>/).",
    )  # fmt: skip
    register_as: str | None = option(
        None, "--register-as", metavar="NAME",
        help="Register the best reconstruction by --eval (or the single --sigma-rel) as a new version.",
    )  # fmt: skip
    alias: str | None = option(
        None, "--alias", metavar="ALIAS", help="Point this alias of --register-as at the new version."
    )
    max_shard_size: int | str | None = option(
        DEFAULT_MAX_SHARD_SIZE, "--max-shard-size", metavar="SIZE", convert=size_or_none,
        help="Above this size the weights written are sharded (bytes, or e.g. 2GiB; none: never).",
    )  # fmt: skip
    model_factory: str | None = option(
        None, "--model-factory", metavar=_MODULE_FUNCTION,
        help="Build the model with this instead of the run's recorded architecture.",
    )  # fmt: skip
    model_kwargs: dict | None = option(  # noqa: RUF009 (option() returns a dataclasses.field)
        None,
        "--model-kwargs",
        metavar="JSON",
        convert=json_object,
        help="Keyword arguments for --model-factory.",
    )
    trust_modules: Sequence[str] = option(
        (), "--trust-module", metavar="PREFIX",
        help="Import the model factory the run recorded if its module is under PREFIX (repeatable).",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if isinstance(self.sigma_rels, (int, float)):  # one target
            self.sigma_rels = (self.sigma_rels,)
        self.sigma_rels = sigma_rel_list(self.sigma_rels, "--sigma-rel")
