"""The click app behind ``mlflow-ema``: a thin layer over the library.

Nothing heavy is imported at start-up (``mlflow-ema --help`` answers at once); each
command imports torch and mlflow when it runs. Exit codes: 0 success, 1 an error
(one line on stderr; ``--debug`` shows the traceback), 2 a usage error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click
from mlflow_ema.cli.console import Group, detail, emit, note, progress
from mlflow_ema.cli.options import options_from, values_for

from mlflow_ema._version import __version__
from mlflow_ema.average_options import AverageOptions, selection_fields
from mlflow_ema.posthoc_options import PosthocOptions

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


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


@click.group(cls=Group, context_settings=CONTEXT)
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
      mlflow-ema posthoc --run <run_id> --eval my_pkg.evals:val_acc --register-as digits-phema
                                                         choose the EMA length after training
      mlflow-ema inspect models:/<model_id>              a checkpoint's manifest and tensors
    """
    ctx.obj = {"tracking_uri": tracking_uri}  # set by each command, once its output is quiet


def _experiments(experiments: tuple[str, ...], run_id: str | None) -> tuple[str, ...]:
    """The named experiments; none named (and no --run): $MLFLOW_EXPERIMENT_NAME, else the
    Default experiment (id 0), where runs go when the training script set no experiment."""
    from mlflow_ema.selection import default_experiments

    if experiments or run_id:
        return experiments
    return default_experiments()


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
@options_from(dataclasses.fields(AverageOptions))  # one option per field, declared there
@click.option("--dry-run", is_flag=True, help="Print the selection and stop.")
@json_option
def average(dry_run: bool, as_json: bool, **params: Any) -> None:
    """Average the best checkpoints of a sweep (or of one run) and register the soup.

    Ranks runs by their best (or last) checkpoint's METRIC, takes the top k, checks that
    they fit together (tensors, init fingerprint, sha256, finite weights), averages them
    one tensor at a time, logs the averaging as an MLflow run and registers the model.
    """
    from mlflow_ema import workflow

    params["experiments"] = _experiments(params["experiments"], params["run_id"])
    options = AverageOptions(**values_for(dataclasses.fields(AverageOptions), params))
    workflow.check_options(options)  # before the store is touched
    _open_store()
    selection = workflow.plan(options)
    for text in selection.warnings:
        note(f"warning: {text}")
    if dry_run:
        data = {"selection": [c.as_dict() for c in selection.candidates]}
        emit(as_json, data, _selection_table(selection.candidates))
        return
    if not as_json:
        detail(_selection_table(selection.candidates))
    result = workflow.average_runs(options, selection=selection, progress=progress(as_json))
    if result.registered and result.soup_value is None:  # its version is tagged mlflow_ema.scored=false
        note("note: the soup was not scored (averaged without --eval); promote --if-better will refuse it")
    emit(as_json, _average_data(result), _average_text(result, options.strategy, options.metric))


def _open_store() -> None:
    """The tracking store must exist and answer before a command uses it (see mlflow_ema.stores)."""
    import mlflow

    from mlflow_ema.stores import check_store

    check_store(mlflow.get_tracking_uri())


def _average_data(result) -> dict:
    return {
        "members": [{**c.as_dict(), "weight": w} for c, w in result.members],
        "rejected": [{**c.as_dict(), "score": s} for c, s in result.rejected],
        "soup_value": result.soup_value,
        "scored": result.soup_value is not None,
        "registered": None if result.registered is None else vars(result.registered),
        "output": result.output,
    }


def _average_text(result, strategy: str, metric: str) -> str:
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
    return "\n".join(lines)


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
    from mlflow_ema.registry import check_promotion
    from mlflow_ema.registry import promote as do_promote

    if version is None and from_alias is None:
        from_alias = "candidate"
    check_promotion(name, to=to, version=version, from_alias=from_alias, if_better=if_better, mode=mode,
                     copy_to=copy_to)  # fmt: skip
    _open_store()
    result = do_promote(name, to=to, version=version, from_alias=from_alias, if_better=if_better, mode=mode,
                        copy_to=copy_to)  # fmt: skip
    verb = "promoted" if result.promoted else "not promoted"
    text = f"{verb}: {name} {result.reason}" + (f"; copied to {result.copied_to}" if result.copied_to else "")
    emit(as_json, vars(result), text)


@main.command(name="ls", context_settings=CONTEXT)
@config_option
@options_from(selection_fields())  # the selection fields of AverageOptions
@click.option("--top-k", type=click.IntRange(min=1), default=20, show_default=True, help="How many rows.")
@json_option
def ls_command(top_k: int, as_json: bool, **params: Any) -> None:
    """Rank runs (or one run's checkpoints) by a metric linked to their checkpoints."""
    from mlflow_ema.selection import select

    params["experiments"] = _experiments(params["experiments"], params["run_id"])
    kwargs = values_for(selection_fields(), params)
    _open_store()
    selection = select(**kwargs, top_k=top_k, min_k=1)
    for text in selection.warnings:
        if not text.startswith("only "):
            note(f"note: {text}")
    emit(as_json, [c.as_dict() for c in selection.candidates], _selection_table(selection.candidates))


@main.command(context_settings=CONTEXT)
@config_option
@options_from(dataclasses.fields(PosthocOptions))  # one option per field, declared there
@json_option
def posthoc(as_json: bool, **params: Any) -> None:
    """Choose the EMA length after training, from a run's post-hoc EMA snapshots.

    The run must have been trained with `autolog(posthoc_every_n_steps=N)`. For each
    --sigma-rel, the snapshots taken by the step are combined (least squares over the
    power-function EMA profiles, Karras et al. 2024) into the EMA of that length, scored
    with --eval, and the curve is logged to a run; --register-as registers the best one
    and --output writes them. --json prints one object per --sigma-rel.
    """
    from mlflow_ema import posthoc as library

    options = PosthocOptions(**values_for(dataclasses.fields(PosthocOptions), params))
    library.check_posthoc(options)  # before the store is touched
    _open_store()
    result = library.reconstruct_ema(options, progress=progress(as_json))
    data = []
    for plan in result.reconstructions:
        chosen = plan is result.chosen
        registered = vars(result.registered) if chosen and result.registered else None
        data.append({**plan.as_dict(), "chosen": chosen, "registered": registered, "run_id": result.run_id})
    emit(as_json, data, _posthoc_text(result, options.metric))


def _posthoc_text(result, metric: str) -> str:
    rows = [("sigma_rel", metric, "snapshots", "")]
    for plan in result.reconstructions:
        score = "-" if plan.score is None else f"{plan.score:.6g}"
        used = sum(1 for _, c in plan.coefficients if c != 0.0)
        rows.append((f"{plan.sigma_rel:g}", score, str(used), "<- chosen" if plan is result.chosen else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"at step {result.reconstructions[0].step}; logged to run {result.run_id}")
    if result.registered:
        r = result.registered
        where = f"models:/{r.name}@{r.alias}" if r.alias else f"models:/{r.name}/{r.version}"
        lines.append(
            f"registered {r.name} version {r.version} ({where}), sigma_rel {result.chosen.sigma_rel:g}"
        )
    outputs = [p.output for p in result.reconstructions if p.output]
    if outputs:
        lines.append(f"wrote {', '.join(outputs)}")
    return "\n".join(lines)


@main.command(context_settings=CONTEXT)
@click.argument("checkpoint")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check.")
@json_option
def inspect(checkpoint, no_verify, as_json):
    """Show a checkpoint's manifest and tensors: a local folder, models:/<model_id> (a run's
    checkpoint), models:/NAME@ALIAS or models:/NAME/VERSION (a registered soup), runs:/..."""
    import tempfile
    from pathlib import Path

    from mlflow_ema.checkpoint import read_manifest, verify_checkpoint, weights_digest
    from mlflow_ema.errors import ChecksumMismatchError
    from mlflow_ema.loading import download_checkpoint, is_uri
    from mlflow_ema.soup import tensor_specs

    with tempfile.TemporaryDirectory() as tmp:
        path, expected = Path(checkpoint), None
        if is_uri(checkpoint):
            _open_store()
            path, expected = download_checkpoint(checkpoint, Path(tmp))
        manifest = read_manifest(path) if no_verify else verify_checkpoint(path)
        if expected is not None and not no_verify and weights_digest(manifest) != expected:
            raise ChecksumMismatchError(
                f"{checkpoint}: the soup's weights do not match the version's sha256 tag"
            )
        tensors = tensor_specs(path)
    data = {"manifest": vars(manifest), "tensors": tensors}
    lines = [f"{k}: {v}" for k, v in vars(manifest).items() if k not in ("files", "metadata", "aliases")]
    lines += [f"file {n}: {f['bytes']} bytes, sha256 {f['sha256']}" + ("" if no_verify else " (verified)")
              for n, f in manifest.files.items()]  # fmt: skip
    lines += [f"alias {a} -> {t}" for a, t in manifest.aliases.items()]
    width = max((len(t["name"]) for t in tensors), default=4)
    lines += ["", f"{'tensor'.ljust(width)}  dtype  shape"]
    lines += [f"{t['name'].ljust(width)}  {t['dtype']:<5}  {t['shape']}" for t in tensors]
    emit(as_json, data, "\n".join(lines))


if __name__ == "__main__":
    main()
