"""Checks on the tracking store before a command uses it.

- A server (``http(s)://``) must answer at all: one request with a short timeout and no
  retries, so a closed port or a wrong host name fails in seconds instead of the minutes
  MLflow's retry policy takes (that policy stays as it is for every later request: it rides
  out rate limits and slow uploads). Any HTTP answer counts, even 401, 429 or 503.
- A local store (``sqlite:///path``, ``file:`` or a plain path) must exist: MLflow creates a
  missing one, folders included, on its first request, even a read, so a typo would
  otherwise leave an empty ``mlflow.db`` behind.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow_ema.errors import StoreError

CONNECT_TIMEOUT = 5.0  # seconds to open the connection
ANSWER_TIMEOUT = 20.0  # seconds for the whole check, answer included


def check_store(uri: str) -> None:
    """Raise :class:`StoreError` (one line) unless the store at ``uri`` exists and answers."""
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        check_server(uri)
        return
    path = local_store_path(uri)
    if path is not None and not path.exists():
        raise StoreError(
            f"no MLflow store at {path} ({uri}): check the path, run from the folder that holds it, "
            "or give --tracking-uri"
        )


def local_store_path(uri: str) -> Path | None:
    """The file or folder of a local store (sqlite file, file store), None for anything else
    (a server, another database, an in-memory sqlite)."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "sqlite":
        # sqlite:///relative.db, sqlite:////absolute.db (SQLAlchemy's URL form)
        database = unquote(uri.split("://", 1)[1])
        database = database[1:] if database.startswith("/") else database
        database = database.split("?", 1)[0]
        return Path(database) if database and database != ":memory:" else None
    if scheme == "file":
        return Path(unquote(parsed.path))
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):  # a plain path
        return Path(uri)
    return None


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder behind ``artifact_uri`` when MLflow keeps those artifacts on this machine
    (its local artifact repository: a ``file:`` URI or a plain path), else None (a server's
    ``mlflow-artifacts:``, a bucket)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    repo = get_artifact_repository(artifact_uri)
    return Path(repo.artifact_dir) if isinstance(repo, LocalArtifactRepository) else None


def check_server(uri: str) -> None:
    """One GET of ``<uri>/health`` with a short timeout and no retries; any HTTP answer is
    fine. A refused connection, an unknown host or no answer in time is a one-line error."""
    outcome: list[BaseException | None] = []
    worker = threading.Thread(target=lambda: outcome.append(_probe(uri)), daemon=True)
    worker.start()
    worker.join(ANSWER_TIMEOUT + CONNECT_TIMEOUT)  # name resolution has no timeout of its own
    if not outcome:
        raise StoreError(f"the tracking server at {uri} did not answer within {ANSWER_TIMEOUT:.0f} s")
    if outcome[0] is not None:
        raise StoreError(f"cannot reach the tracking server at {uri}: {_reason(outcome[0])}")


def _probe(uri: str) -> BaseException | None:
    import requests

    try:
        requests.get(
            uri.rstrip("/") + "/health", timeout=(CONNECT_TIMEOUT, ANSWER_TIMEOUT), allow_redirects=False
        ).close()
    except requests.exceptions.SSLError:
        return None  # it answered; TLS settings are MLflow's business (MLFLOW_TRACKING_INSECURE_TLS...)
    except requests.exceptions.RequestException as e:
        return e
    return None


def _reason(error: BaseException) -> str:
    """What went wrong, in a few words, from requests' nested exceptions."""
    text = str(error)
    for marker, reason in (
        ("Name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("getaddrinfo failed", "unknown host"),
        ("Temporary failure in name resolution", "unknown host"),
        ("Connection refused", "connection refused"),
        ("timed out", "no answer in time"),
        ("Network is unreachable", "network unreachable"),
    ):
        if marker in text:
            return reason
    return type(error).__name__
