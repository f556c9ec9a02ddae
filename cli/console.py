"""What ``mlflow-ema`` writes where.

- stdout carries only the result (a table, or JSON with ``--json``).
- stderr carries only what matters: an error is exactly one line, ``mlflow-ema: error: ...``
  (exit 1; a usage error exits 2, also in one line). On success, our notes and warnings
  follow the result; progress bars show only when stderr is a terminal, never with
  ``--json``. What the libraries print meanwhile (MLflow's "View run" lines, its logs, its
  download progress bar, third-party warnings) is dropped, unless ``--debug``, which also
  shows tracebacks.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import click

_OUT, _NOTES, _ERR = "mlflow_ema.stdout", "mlflow_ema.notes", "mlflow_ema.stderr"
# Set for every command: MLflow's own download bar and URL lines are not ours to show.
_QUIET_MLFLOW = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


class Command(click.Command):
    """Runs a command with the libraries' output kept off stdout and stderr (see the
    module docstring); our notes reach stderr after a success, live on a terminal."""

    def invoke(self, ctx: click.Context) -> Any:
        os.environ.update(_QUIET_MLFLOW)
        ctx.meta[_OUT], ctx.meta[_ERR] = sys.stdout, sys.stderr
        if ctx.find_root().params.get("debug"):
            ctx.meta[_NOTES] = None  # live
            with contextlib.redirect_stdout(sys.stderr):
                _use_tracking_uri(ctx)
                return super().invoke(ctx)
        ctx.meta[_NOTES] = None if sys.stderr.isatty() else []
        with _quiet_libraries() as caught:
            _use_tracking_uri(ctx)  # importing mlflow may warn: quietly
            result = super().invoke(ctx)
        for warning in caught:  # ours only: the libraries' are not the user's business here
            text = str(warning.message)
            if text.startswith("mlflow-ema: "):
                note(text.replace("mlflow-ema: ", "warning: ", 1))
        for line in ctx.meta[_NOTES] or ():
            click.echo(line, file=ctx.meta[_ERR])
        return result


def _use_tracking_uri(ctx: click.Context) -> None:
    """``--tracking-uri`` (the group's option), for MLflow."""
    uri = (ctx.find_root().obj or {}).get("tracking_uri")
    if uri:
        import mlflow

        mlflow.set_tracking_uri(uri)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[list[warnings.WarningMessage]]:
    sink = io.StringIO()
    mlflow_logger = logging.getLogger("mlflow")
    level = mlflow_logger.level
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        warnings.simplefilter("always")
        mlflow_logger.setLevel(logging.ERROR)
        try:
            yield caught
        finally:
            mlflow_logger.setLevel(level)


class Group(click.Group):
    """Turns every error into one line on stderr: exit 1 for an error, 2 for a usage error."""

    command_class = Command

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:  # fmt: skip
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            click.echo(f"mlflow-ema: error: {_usage_line(e)}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("mlflow-ema: error: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            from mlflow_ema.cli.errors import one_line

            click.echo(f"mlflow-ema: error: {one_line(e)}", err=True)
            ctx.exit(1)


def _usage_line(error: click.ClickException) -> str:
    message = " ".join(error.format_message().split())
    ctx = getattr(error, "ctx", None)
    if isinstance(error, click.UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


def emit(as_json: bool, data: Any, text: str) -> None:
    """The command's result, on stdout (the notes so far first, on stderr: the command is done)."""
    meta = click.get_current_context().meta
    for line in meta.get(_NOTES) or ():
        click.echo(line, file=meta[_ERR])
    if meta.get(_NOTES):
        meta[_NOTES] = []
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text, file=meta.get(_OUT))


def note(text: str) -> None:
    """A line for stderr: ``mlflow-ema: <text>``, now on a terminal, else after a success."""
    _stderr_line(text if text.startswith("mlflow-ema: ") else f"mlflow-ema: {text}")


def detail(text: str) -> None:
    """Like :func:`note`, for text of several lines shown as they are (the selection table)."""
    for line in text.splitlines():
        _stderr_line(line)


def _stderr_line(line: str) -> None:
    meta = click.get_current_context().meta
    if meta.get(_NOTES) is None:
        click.echo(line, file=meta.get(_ERR) or sys.stderr)
    else:
        meta[_NOTES].append(line)


def progress(as_json: bool) -> Callable[[str, int, int], None] | None:
    """``progress(stage, done, total)`` drawing one bar per stage, when stderr is a terminal
    and the output is not JSON; None otherwise."""
    err = click.get_current_context().meta.get(_ERR) or sys.stderr
    if as_json or not err.isatty():
        return None
    bars: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = click.progressbar(length=total, label=stage.ljust(11), file=err)
            bar.__enter__()
        bar.update(done - bar.pos)
        if done >= total:
            bar.__exit__(None, None, None)

    return update
