"""One line for any error a command raises (``mlflow-ema: error: <this>``)."""

from __future__ import annotations

import re


def one_line(error: Exception) -> str:
    """The error as one line: the message's first line, an out-of-date store schema with the
    command that upgrades it, an unreachable server with its address."""
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    cause: BaseException | None = error
    for _ in range(10):  # MLflow raises it when the store opens; a wrapper may have chained it
        if cause is None:
            break
        text = str(getattr(cause, "message", None) or cause)
        if "Detected out-of-date database schema" in text:
            return schema_mismatch(text)
        cause = cause.__cause__ or cause.__context__
    if (
        "Max retries exceeded" in message
        or "Connection refused" in message
        or "ConnectionError" in type(error).__name__
    ):
        import mlflow

        return f"cannot reach the tracking server at {mlflow.get_tracking_uri()} ({message.splitlines()[0][:200]})"
    first = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    from mlflow_ema.errors import MlflowEmaError

    expected = isinstance(error, MlflowEmaError) or any(
        c.__name__ == "MlflowException" for c in type(error).__mro__
    )
    if not expected:  # a bug or an unexpected failure: say what it is, and how to see more
        first = f"{type(error).__name__}: {first} (--debug shows the traceback)"
    return first[:500]


def schema_mismatch(message: str) -> str:
    """MLflow's "Detected out-of-date database schema (found version X, but expected Y)" as
    one line with the command to run, or the advice to upgrade MLflow when X is newer."""
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
