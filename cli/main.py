"""The click app behind ``mlflow-ema``: a thin layer over the library.

Nothing heavy is imported at start-up (``mlflow-ema --help`` answers at once); each
command imports torch and mlflow when it runs. Exit codes: 0 success, 1 an error
(one line on stderr; ``--debug`` shows the traceback), 2 a usage error.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import click

from mlflow_ema._version import __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Command(click.Command):
    """Runs a command with whatever the libraries it calls print (MLflow's "View run" and
    registration notices) sent to stderr: stdout carries only the result, so ``--json``
    output parses."""

    def invoke(self, ctx: click.Context) -> Any:
        ctx.meta["mlflow_ema.stdout"] = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            return super().invoke(ctx)


class _Group(click.Group):
    """Turns errors into one line on stderr and exit code 1, unless ``--debug``."""

    command_class = _Command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"mlflow-ema: error: {_one_line(e)}", err=True)
            ctx.exit(1)


def _one_line(error: Exception) -> str:
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    cause: BaseException | None = error
    for _ in range(10):  # MLflow raises it when the store opens; a wrapper may have chained it
        if cause is None:
            break
        text = str(getattr(cause, "message", None) or cause)
        if "Detected out-of-date database schema" in text:
            return _schema_mismatch(text)
        cause = cause.__cause__ or cause.__context__
    if (
        "Max retries exceeded" in message
        or "Connection refused" in message
        or "ConnectionError" in type(error).__name__
    ):
        import mlflow

        return f"cannot reach the tracking server at {mlflow.get_tracking_uri()} ({message.splitlines()[0][:200]})"
    first = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    return first[:500]


def _schema_mismatch(message: str) -> str:
    """MLflow's "Detected out-of-date database schema (found version X, but expected Y)" as
    one line with the command to run, or the advice to upgrade MLflow when X is newer."""
    import re

    import mlflow

    uri = re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", mlflow.get_tracking_uri())  # no password
    found = re.search(r"found version (\w+), but expected (\w+)", message)
    have, need = found.groups() if found else ("unknown", "the latest")
    try:
        from alembic.script import ScriptDirectory
        from mlflow.store.db.utils import _get_alembic_config

        script = ScriptDirectory.from_config(_get_alembic_config(""))
    except Exception:  # MLflow's internals moved: say the usual thing
        script = None
    if script is not None and found and have != "None":
        try:
            script.get_revision(have)
        except Exception:  # a revision this MLflow's migrations do not know: a newer MLflow wrote it
            return (
                f"the MLflow store {uri} has schema revision {have}, unknown to this MLflow "
                f"{mlflow.__version__} (it needs {need}): the store was written by a newer MLflow; upgrade MLflow"
            )
    return (
        f"the MLflow store {uri} has an older schema (revision {have}, this MLflow {mlflow.__version__} "
        f"needs {need}); back it up, then run: mlflow db upgrade {uri}"
    )


def _load_config(ctx: click.Context, param: click.Parameter, path: str | None) -> str | None:
    """``--config FILE``: a YAML mapping of option names (dashes or underscores) to values.
    Options given on the command line win over the file."""
    if not path:
        return path
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise click.BadParameter(f"cannot read {path}: {e}", ctx=ctx, param=param) from None
    if not isinstance(data, dict):
        raise click.BadParameter(
            f"{path} must hold a mapping of option names to values", ctx=ctx, param=param
        )
    # keys are the long option names (--top-k: top-k or top_k), or the parameter names
    known: dict[str, click.Parameter] = {}
    for p in ctx.command.params:
        for flag in [*p.opts, p.name or ""]:
            if flag.startswith("--") or flag == p.name:
                known[flag.lstrip("-").replace("-", "_")] = p
    defaults = {}
    for key, value in data.items():
        target = known.get(str(key).replace("-", "_"))
        if target is None or target.name == "config":
            raise click.BadParameter(f"{path}: unknown option {key!r}", ctx=ctx, param=param)
        if getattr(target, "multiple", False) and not isinstance(value, list):
            value = [value]
        defaults[target.name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


config_option = click.option(
    "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False, callback=_load_config,
    help="YAML file of options (keys named as the options); the command line overrides it.",
)  # fmt: skip
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")


def _emit(as_json: bool, data: Any, text: str) -> None:
    out = click.get_current_context().meta.get("mlflow_ema.stdout")
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text, file=out)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="mlflow-ema")
@click.option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", metavar="URI",
    help="MLflow tracking server or store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).",
)  # fmt: skip
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, tracking_uri: str | None, debug: bool) -> None:
    """Weight averaging for MLflow-tracked PyTorch training.

    \b
    During training, `mlflow_ema.autolog()` logs raw and EMA checkpoints. Then:
      mlflow-ema ls --experiment digits                  rank runs by their best checkpoint
      mlflow-ema average --experiment digits --top-k 5 --register-as digits-soup --alias candidate
      mlflow-ema promote digits-soup --from-alias candidate --to champion --if-better ema/val_acc
      mlflow-ema inspect models:/<model_id>              a checkpoint's manifest and tensors
    """
    ctx.obj = {"tracking_uri": tracking_uri}
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)


def _selection_options(func):
    options = [
        click.option("--experiment", "-e", "experiments", multiple=True, metavar="NAME",
                     help="Experiment name or id (repeatable). Default: $MLFLOW_EXPERIMENT_NAME."),
        click.option("--run", "run_id", metavar="RUN_ID",
                     help="Rank the checkpoints within this one run instead (SWA / latest-weight averaging)."),
        click.option("--filter", "filter_string", metavar="EXPR", help='MLflow run filter, e.g. "params.lr < 0.1".'),
        click.option("--status", "statuses", multiple=True, default=["FINISHED"], show_default=True,
                     help="Run statuses to include (repeatable)."),
        click.option("--metric", default="ema/val_acc", show_default=True,
                     help="Metric linked to the checkpoints to rank by."),
        click.option("--mode", type=click.Choice(["max", "min"]), default="max", show_default=True),
        click.option("--kind", type=click.Choice(["ema", "raw"]), default="ema", show_default=True,
                     help="Which checkpoints: the EMA or the raw weights."),
        click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
                     help="Each run's best checkpoint by the metric, or its last one."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def _experiments(experiments: tuple[str, ...], run_id: str | None) -> tuple[str, ...]:
    import os

    if experiments or run_id:
        return experiments
    default = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if not default:
        raise click.UsageError("name an --experiment (or set MLFLOW_EXPERIMENT_NAME), or a --run")
    return (default,)


def _selection_table(candidates: list) -> str:
    rows = [("rank", "run", "run id", "checkpoint", "step", "value")]
    for i, c in enumerate(candidates, 1):
        value = "-" if c.value is None else f"{c.value:.6g}"
        rows.append((str(i), c.run_name or "-", c.run_id[:12], c.name, str(c.step), value))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


@main.command(context_settings=CONTEXT)
@config_option
@_selection_options
@click.option(
    "--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="How many to average."
)
@click.option(
    "--min-k", type=click.IntRange(min=1), help="Go on (with a warning) when at least this many qualify."
)
@click.option(
    "--strategy",
    type=click.Choice(["uniform", "greedy"]),
    default="uniform",
    show_default=True,
    help="greedy: add members in rank order, keep each only if --eval improves (Wortsman et al. 2022).",
)
@click.option(
    "--weights",
    default="uniform",
    show_default=True,
    metavar="uniform|metric|W1,W2,...",
    help="Member weights: equal, proportional to the metric, or an explicit list in rank order.",
)
@click.option(
    "--eval",
    "eval_fn",
    metavar="MODULE:FUNCTION",
    help="Scores a model (called with the module, returns a float); needed by --strategy greedy.",
)
@click.option(
    "--update-bn",
    metavar="MODULE:FUNCTION",
    help="Returns a data loader; BatchNorm statistics are recomputed on it (swa_utils.update_bn).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16", "float64"]),
    help="Output dtype (default: the inputs').",
)
@click.option("--accumulate", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option(
    "--allow-different-init", is_flag=True, help="Average runs that did not start from the same weights."
)
@click.option(
    "--register-as", metavar="NAME", help="Register the soup as a new version of this registered model."
)
@click.option("--alias", metavar="ALIAS", help="Point this alias of --register-as at the new version.")
@click.option(
    "--output", type=click.Path(file_okay=False), help="Also write the soup checkpoint to this new folder."
)
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    metavar="SIZE",
    help="Above this size the soup's weights (--output, registered artifacts) are sharded the Hugging Face "
    "way: bytes, or e.g. 500MB, 2GiB; none: never.",
)
@click.option(
    "--model-factory",
    metavar="MODULE:FUNCTION",
    help="Rebuild the model with this instead of the run's record.",
)
@click.option("--model-kwargs", metavar="JSON", help="Keyword arguments for --model-factory.")
@click.option("--dry-run", is_flag=True, help="Print the selection and stop.")
@json_option
def average(experiments, run_id, filter_string, statuses, metric, mode, kind, checkpoint, top_k, min_k, strategy,
            weights, eval_fn, update_bn, dtype, accumulate, allow_different_init, register_as, alias, output,
            max_shard_size, model_factory, model_kwargs, dry_run, as_json):  # fmt: skip
    """Average the best checkpoints of a sweep (or of one run) and register the soup.

    Ranks runs by their best (or last) checkpoint's METRIC, takes the top k, checks that
    they fit together (tensors, init fingerprint, sha256, finite weights), averages them
    one tensor at a time, logs the averaging as an MLflow run and registers the model.
    """
    import os

    from mlflow_ema import workflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own bar shows the downloads

    options = workflow.AverageOptions(
        experiments=_experiments(experiments, run_id), run_id=run_id, filter_string=filter_string,
        statuses=statuses, metric=metric, mode=mode, kind=kind, checkpoint=checkpoint, top_k=top_k, min_k=min_k,
        strategy=strategy, weights=weights, eval_fn=eval_fn, update_bn=update_bn, dtype=dtype,
        accumulate=accumulate, allow_different_init=allow_different_init, register_as=register_as, alias=alias,
        output=output, model_factory=model_factory,
        max_shard_size=None if str(max_shard_size).lower() == "none" else str(max_shard_size),
        model_kwargs=json.loads(model_kwargs) if model_kwargs else None,
    )  # fmt: skip
    selection = workflow.plan(options)
    for note in selection.warnings:
        click.echo(f"mlflow-ema: warning: {note}", err=True)
    if dry_run:
        data = {"selection": [c.as_dict() for c in selection.candidates]}
        _emit(as_json, data, _selection_table(selection.candidates))
        return
    if not as_json:
        click.echo(_selection_table(selection.candidates), err=True)
    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = click.progressbar(length=total, label=stage.ljust(11), file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)
        if done >= total:
            bar.__exit__(None, None, None)

    result = workflow.average_runs(options, selection=selection, progress=progress)
    data = {
        "members": [{**c.as_dict(), "weight": w} for c, w in result.members],
        "rejected": [{**c.as_dict(), "score": s} for c, s in result.rejected],
        "soup_value": result.soup_value,
        "registered": None if result.registered is None else vars(result.registered),
        "output": result.output,
    }
    count = len(result.members)
    lines = [f"averaged {count} checkpoint{'s' if count != 1 else ''} ({strategy})"]
    if result.soup_value is not None:
        lines.append(f"soup {metric}: {result.soup_value:.6g}")
    if result.registered:
        r = result.registered
        where = f"models:/{r.name}@{r.alias}" if r.alias else f"models:/{r.name}/{r.version}"
        lines.append(f"registered {r.name} version {r.version} ({where}), run {r.run_id}")
    if result.output:
        lines.append(f"wrote {result.output}")
    _emit(as_json, data, "\n".join(lines))


@main.command(context_settings=CONTEXT)
@config_option
@click.argument("name")
@click.option("--version", metavar="N", help="The version to promote.")
@click.option(
    "--from-alias", metavar="ALIAS", help="Promote the version this alias points to (default: candidate)."
)
@click.option("--to", "to", default="champion", show_default=True, metavar="ALIAS", help="The alias to move.")
@click.option(
    "--if-better", metavar="METRIC", help="Only if the version's recorded METRIC beats the current holder's."
)
@click.option("--mode", type=click.Choice(["max", "min"]), default="max", show_default=True)
@click.option(
    "--copy-to", metavar="NAME", help="Also copy the version to this registered model (same alias there)."
)
@json_option
def promote(name, version, from_alias, to, if_better, mode, copy_to, as_json):
    """Move alias --to of registered model NAME to a version (MLflow aliases, not stages)."""
    from mlflow_ema.registry import promote as do_promote

    if version is None and from_alias is None:
        from_alias = "candidate"
    result = do_promote(name, to=to, version=version, from_alias=from_alias, if_better=if_better, mode=mode,
                        copy_to=copy_to)  # fmt: skip
    verb = "promoted" if result.promoted else "not promoted"
    text = f"{verb}: {name} {result.reason}" + (f"; copied to {result.copied_to}" if result.copied_to else "")
    _emit(as_json, vars(result), text)


@main.command(name="ls", context_settings=CONTEXT)
@config_option
@_selection_options
@click.option("--top-k", type=click.IntRange(min=1), default=20, show_default=True, help="How many rows.")
@json_option
def ls_command(experiments, run_id, filter_string, statuses, metric, mode, kind, checkpoint, top_k, as_json):
    """Rank runs (or one run's checkpoints) by a metric linked to their checkpoints."""
    from mlflow_ema.selection import select

    selection = select(experiments=_experiments(experiments, run_id), run_id=run_id, filter_string=filter_string,
                       statuses=statuses, metric=metric, mode=mode, kind=kind, checkpoint=checkpoint, top_k=top_k,
                       min_k=1)  # fmt: skip
    for note in selection.warnings:
        if not note.startswith("only "):
            click.echo(f"mlflow-ema: note: {note}", err=True)
    _emit(as_json, [c.as_dict() for c in selection.candidates], _selection_table(selection.candidates))


@main.command(context_settings=CONTEXT)
@click.argument("checkpoint")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check.")
@json_option
def inspect(checkpoint, no_verify, as_json):
    """Show a checkpoint's manifest and tensors: a local folder or models:/<model_id>."""
    import tempfile
    from pathlib import Path

    from mlflow_ema.checkpoint import read_manifest, verify_checkpoint
    from mlflow_ema.soup import tensor_specs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(checkpoint)
        if checkpoint.startswith(("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://")):
            import mlflow

            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=checkpoint, dst_path=tmp))
        manifest = read_manifest(path) if no_verify else verify_checkpoint(path)
        tensors = tensor_specs(path)
    data = {"manifest": vars(manifest), "tensors": tensors}
    lines = [f"{k}: {v}" for k, v in vars(manifest).items() if k not in ("files", "metadata", "aliases")]
    lines += [f"file {n}: {f['bytes']} bytes, sha256 {f['sha256']}" + ("" if no_verify else " (verified)")
              for n, f in manifest.files.items()]  # fmt: skip
    lines += [f"alias {a} -> {t}" for a, t in manifest.aliases.items()]
    width = max((len(t["name"]) for t in tensors), default=4)
    lines += ["", f"{'tensor'.ljust(width)}  dtype  shape"]
    lines += [f"{t['name'].ljust(width)}  {t['dtype']:<5}  {t['shape']}" for t in tensors]
    _emit(as_json, data, "\n".join(lines))


if __name__ == "__main__":
    main()
