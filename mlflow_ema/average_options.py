"""The options of ``mlflow-ema average``, declared once: the fields of :class:`AverageOptions`.

A field is both the library's keyword argument (``mlflow_ema.AverageOptions(top_k=3)``)
and, through its metadata, the command line's option (``--top-k 3``): the click command
derives its options, its parameters and the construction of ``AverageOptions`` from the
fields (``cli/options.py``), and the soup run's params come from them too. Adding an
option is one field here, plus the docs. This module imports neither torch nor mlflow
(nor click): ``mlflow-ema average --help`` reads it.

The metadata of a field, made by :func:`option`:

- ``flags``: the option's names, the long one first (``("--experiment", "-e")``);
- ``help``, ``metavar``; ``choices`` (the only values allowed), ``at_least`` (an integer
  at least this), ``folder`` (a path that must not be an existing file);
- ``multiple`` (repeatable: the default is a tuple), ``is_flag`` (the default is a bool)
  and ``show_default`` (any other default but None): derived from the default;
- ``convert(value, flag)``: the command line's text to the field's value (applied by the
  CLI only, before ``AverageOptions`` is built; a bad value is an error, exit 1);
- ``selection``: an option that chooses the checkpoints (``mlflow-ema ls`` has it too;
  the field is a keyword argument of ``mlflow_ema.selection.select``);
- ``param``: the soup run's param that records the value (None: not recorded), which
  records ``param_if_none`` when the value is None.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from mlflow_ema.errors import MlflowEmaError
from mlflow_ema.sizes import DEFAULT_MAX_SHARD_SIZE


def option(
    default: Any,
    *flags: str,
    help: str | None = None,
    metavar: str | None = None,
    choices: Sequence[str] = (),
    at_least: int | None = None,
    folder: bool = False,
    convert: Callable[[Any, str], Any] | None = None,
    selection: bool = False,
    param: str | None = None,
    param_if_none: str = "",
    required: bool = False,
) -> Any:
    """A field of :class:`AverageOptions` with ``default`` and the metadata of its
    command-line option (see the module docstring)."""
    is_flag = isinstance(default, bool)
    metadata = {
        "flags": flags, "help": help, "metavar": metavar, "choices": tuple(choices), "at_least": at_least,
        "folder": folder, "multiple": isinstance(default, tuple), "is_flag": is_flag,
        "show_default": default is not None and not is_flag and default != (), "convert": convert,
        "selection": selection, "param": param, "param_if_none": param_if_none, "required": required,
    }  # fmt: skip
    return dataclasses.field(default=default, metadata=metadata)


def json_object(text: str | None, flag: str) -> dict | None:
    """``--model-kwargs '{"hidden": 32}'``: a JSON object, or None for no text."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise MlflowEmaError(f"{flag} is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise MlflowEmaError(f"{flag} must be a JSON object of keyword arguments, got {text!r}")
    return value


def size_or_none(text: Any, flag: str) -> str | None:
    """``--max-shard-size 2GiB``, or ``none``: None (one file)."""
    return None if str(text).lower() == "none" else str(text)


_MODULE_FUNCTION = "MODULE:FUNCTION"


@dataclasses.dataclass
class AverageOptions:
    """The options of ``mlflow-ema average`` (see its ``--help``): each field's metadata is
    its command-line option (see the module docstring)."""

    # -- selection (shared with ``mlflow-ema ls``) --
    experiments: Sequence[str] = option(
        (), "--experiment", "-e", metavar="NAME", selection=True, param="experiments",
        help="Experiment name or id (repeatable). Default: $MLFLOW_EXPERIMENT_NAME, else the Default experiment.",
    )  # fmt: skip
    run_id: str | None = option(
        None, "--run", metavar="RUN_ID", selection=True, param="run_id",
        help="Rank the checkpoints within this one run instead (SWA / latest-weight averaging).",
    )  # fmt: skip
    filter_string: str | None = option(
        None, "--filter", metavar="EXPR", selection=True, param="filter",
        help='MLflow run filter, e.g. "params.lr < 0.1".',
    )  # fmt: skip
    statuses: Sequence[str] = option(
        ("FINISHED",), "--status", selection=True, help="Run statuses to include (repeatable)."
    )
    metric: str = option(
        "ema/val_acc", "--metric", selection=True, param="metric",
        help="Metric linked to the checkpoints to rank by.",
    )  # fmt: skip
    mode: str = option("max", "--mode", choices=("max", "min"), selection=True, param="mode")
    model_name: str | None = option(
        None, "--model", metavar="NAME", selection=True, param="model",
        help="Which model, in runs that train several (a GAN's generator): its checkpoints' mlflow_ema.model_name.",
    )  # fmt: skip
    kind: str = option(
        "ema", "--kind", choices=("ema", "raw", "posthoc"), selection=True, param="kind",
        help="Which checkpoints: the EMA or the raw weights (or post-hoc EMA snapshots, which are never averaged "
        "otherwise).",
    )  # fmt: skip
    checkpoint: str = option(
        "best", "--checkpoint", choices=("best", "last"), selection=True, param="checkpoint",
        help="Each run's best checkpoint by the metric, or its last one.",
    )  # fmt: skip
    # -- how many, and how they are averaged --
    top_k: int = option(5, "--top-k", at_least=1, param="top_k", help="How many to average.")
    min_k: int | None = option(
        None, "--min-k", at_least=1, help="Go on (with a warning) when at least this many qualify."
    )
    strategy: str = option(
        "uniform", "--strategy", choices=("uniform", "greedy"),
        help="greedy: add members in rank order, keep each only if --eval improves (Wortsman et al. 2022).",
    )  # fmt: skip
    # "uniform", "metric" or "0.5,0.3,0.2" (the params record the weights used)
    weights: str = option(
        "uniform", "--weights", metavar="uniform|metric|W1,W2,...",
        help="Member weights: equal, proportional to the metric, or an explicit list in rank order.",
    )  # fmt: skip
    eval_fn: str | None = option(
        None, "--eval", metavar=_MODULE_FUNCTION, param="eval",
        help="Scores a model (called with the module, returns a float); needed by --strategy greedy.",
    )  # fmt: skip
    update_bn: str | None = option(
        None, "--update-bn", metavar=_MODULE_FUNCTION, param="update_bn",
        help="Returns a data loader; BatchNorm statistics are recomputed on it (swa_utils.update_bn).",
    )  # fmt: skip
    dtype: str | None = option(
        None, "--dtype", choices=("float32", "float16", "bfloat16", "float64"), param="dtype",
        param_if_none="input", help="Output dtype (default: the inputs').",
    )  # fmt: skip
    accumulate: str = option("float32", "--accumulate", choices=("float32", "float64"), param="accumulate")
    allow_different_init: bool = option(
        False, "--allow-different-init", help="Average runs that did not start from the same weights."
    )
    # -- what it produces --
    register_as: str | None = option(
        None, "--register-as", metavar="NAME",
        help="Register the soup as a new version of this registered model.",
    )  # fmt: skip
    alias: str | None = option(
        None, "--alias", metavar="ALIAS", help="Point this alias of --register-as at the new version."
    )
    # None: "<the first member's experiment>-soups" (registry.soup_experiment_id)
    soup_experiment: str | None = option(
        None, "--soup-experiment", metavar="NAME",
        help="Experiment of the soup run (created if missing). Default: '<the members' experiment>-soups', "
        "so soup runs never mix with a sweep's runs.",
    )  # fmt: skip
    output: str | None = option(
        None, "--output", folder=True, help="Also write the soup checkpoint to this new folder."
    )
    # the soup's files (None: one file)
    max_shard_size: int | str | None = option(
        DEFAULT_MAX_SHARD_SIZE, "--max-shard-size", metavar="SIZE", convert=size_or_none,
        param="max_shard_size", param_if_none="none",
        help="Above this size the soup's weights (--output, registered artifacts) are sharded the Hugging Face "
        "way: bytes, or e.g. 500MB, 2GiB; none: never.",
    )  # fmt: skip
    # -- the model the soup's weights go into --
    model_factory: str | None = option(
        None, "--model-factory", metavar=_MODULE_FUNCTION,
        help="Rebuild the model with this instead of the run's record.",
    )  # fmt: skip
    model_kwargs: dict | None = option(  # noqa: RUF009 (option() returns a dataclasses.field)
        None, "--model-kwargs", metavar="JSON", convert=json_object,
        help="Keyword arguments for --model-factory.",
    )  # fmt: skip
    serialization: str | None = option(
        None, "--serialization", choices=("pt2", "pickle"), param="serialization", param_if_none="auto",
        help="How the registered version is written. Default: pt2 (torch.export, no pickle) from the architecture "
        "the runs recorded; pickle only for runs of mlflow-ema < 0.4, with a warning. pickle needs --model-factory "
        "(or a trusted recorded factory) and loads only where that code is importable; loading a pickle runs code "
        "from the file.",
    )  # fmt: skip
    # module prefixes whose callables recorded on runs may be imported (plus $MLFLOW_EMA_TRUST_MODULES)
    trust_modules: Sequence[str] = option(
        (), "--trust-module", metavar="PREFIX",
        help="Import the model factory or LightningModule class that the runs recorded if its module is under "
        "PREFIX (repeatable; also $MLFLOW_EMA_TRUST_MODULES, comma-separated). Nothing a run names is imported "
        "otherwise.",
    )  # fmt: skip


def selection_fields() -> list[dataclasses.Field]:
    """The fields that choose the checkpoints: ``mlflow_ema.selection.select``'s keyword
    arguments, and the options ``mlflow-ema ls`` shares with ``average``."""
    return [f for f in dataclasses.fields(AverageOptions) if f.metadata["selection"]]


def selection_kwargs(options: AverageOptions) -> dict[str, Any]:
    """The selection fields' values, by name (see :func:`selection_fields`)."""
    return {f.name: getattr(options, f.name) for f in selection_fields()}


def check_choices(options: AverageOptions) -> None:
    """Every field with ``choices`` holds one of them (or None), as the command line ensures."""
    for f in dataclasses.fields(options):
        value, choices = getattr(options, f.name), f.metadata["choices"]
        if choices and value is not None and value not in choices:
            allowed = " or ".join(choices) if len(choices) == 2 else f"one of {', '.join(choices)}"
            raise MlflowEmaError(f"{f.metadata['flags'][0]} must be {allowed}, got {value!r}")


def recorded_params(options: AverageOptions) -> dict[str, Any]:
    """The soup run's params taken from the options (each field's ``param``), as logged."""
    params = {}
    for f in dataclasses.fields(options):
        if f.metadata["param"] is None:
            continue
        value = getattr(options, f.name)
        if value is None:
            value = f.metadata["param_if_none"]
        elif isinstance(value, (list, tuple)):
            value = list(value)
        params[f.metadata["param"]] = value
    return params
