"""Shared fixtures: scikit-learn's bundled digits (real data, no download), a real MLflow
sqlite store per test, and a real ``mlflow server`` on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch

# mlflow-ema's safety boundary re-raises its own bugs in the tests (and in the scripts they
# start) instead of switching the part off; tests that inject a bug unset it.
os.environ["MLFLOW_EMA_STRICT"] = "1"


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store in a temporary working directory, and a fresh
    mlflow-ema session (no hooks left from other tests)."""
    from mlflow_ema.tracking import _SESSION

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id="0")  # forget the experiment a previous test set
    _SESSION.reset()
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    _SESSION.reset()
    mlflow.set_tracking_uri(None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` with a sqlite backend and proxied artifacts, one worker, on a free port."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(folder / "server.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "mlartifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(folder / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1) as response:
                if response.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("mlflow server did not answer /health within 90 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One live tracking server for the whole test session."""
    proc, uri = start_server(tmp_path_factory.mktemp("mlflow-server"))
    yield uri
    stop_server(proc)


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory, digits):
    """A sqlite store with experiment ``sweep``: runs ``a`` (ema/val_acc 0.1) and ``b`` (0.05)
    fine-tuned from one init for 5 steps, each with one raw and one EMA checkpoint, recording
    the factory ``helpers:make_net`` with ``hidden=16``. Returns (folder, uri). Tests that
    change it put it back."""
    from helpers import make_net, train_steps

    import mlflow_ema
    from mlflow_ema.tracking import _SESSION

    folder = tmp_path_factory.mktemp("small-sweep")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous, previous_id = Path.cwd(), os.environ.get("MLFLOW_EXPERIMENT_ID")
    os.chdir(folder)
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("sweep")  # exports MLFLOW_EXPERIMENT_ID: restored below
        for name, lr in (("a", 0.1), ("b", 0.05)):
            model = make_net(hidden=16)
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            mlflow_ema.watch(model, opt, model_factory="helpers:make_net", model_kwargs={"hidden": 16})
            with mlflow.start_run(run_name=name):
                train_steps(model, opt, digits, 5)
                mlflow_ema.log_checkpoint(metrics={"ema/val_acc": lr})
            _SESSION.reset()
    finally:
        os.chdir(previous)
        mlflow.set_tracking_uri(None)
        if previous_id is None:  # a later test's subprocess would inherit this store's experiment id
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = previous_id
    return folder, uri
