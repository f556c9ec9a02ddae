"""End to end over HTTP against a live ``mlflow server`` (sqlite backend, proxied artifacts):
train a small sweep under autolog, average and register it with the CLI, promote it, then
check the result with MLflow's own client, ``mlflow.pytorch.load_model`` and
``mlflow models predict --env-manager local``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch

import mlflow_ema

ROOT = Path(__file__).resolve().parents[1]
MODEL = "digits-http"


def cli(uri: str, *args: str) -> subprocess.CompletedProcess:
    """``mlflow-ema --tracking-uri URI ARGS`` in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the flag alone must point it at the server
    return subprocess.run(
        [sys.executable, "-m", "mlflow_ema.cli", "--tracking-uri", uri, *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sweep(mlflow_server, tmp_path_factory):
    """A base and three fine-tuned runs logged to the server, averaged into a registered
    soup (alias ``candidate``) and promoted to ``champion``, all over HTTP."""
    from examples.train_digits import main as train
    from mlflow_ema.tracking import _SESSION

    workdir = tmp_path_factory.mktemp("http-sweep")
    old_cwd, old_env = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(workdir)  # nothing may land in a local store: there is none here
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    mlflow.set_tracking_uri(mlflow_server)
    _SESSION.reset()
    try:
        base_run = train(["--experiment", "http", "--run-name", "base", "--epochs", "2", "--quiet"])
        base = next(
            m
            for m in mlflow.search_logged_models(
                experiment_ids=[_experiment_id("http")], output_format="list"
            )
            if m.source_run_id == base_run and m.tags["mlflow_ema.kind"] == "ema"
        )
        tuned = [
            train(["--experiment", "http", "--run-name", f"ft-{seed}", "--init-from", f"models:/{base.model_id}",
                   "--lr", str(lr), "--seed", str(seed), "--augment", how, "--epochs", "2", "--quiet"])
            for seed, lr, how in ((1, 0.01, "none"), (2, 0.02, "shift"), (3, 0.05, "noise"))
        ]  # fmt: skip
        _SESSION.reset()
        average = cli(
            mlflow_server, "average", "-e", "http", "--filter", "attributes.run_name LIKE 'ft-%'",
            "--top-k", "3", "--eval", "examples.train_digits:val_accuracy", "--trust-module", "examples",
            "--register-as", MODEL, "--alias", "candidate", "--json",
        )  # fmt: skip
        assert average.returncode == 0, average.stderr
        promote = cli(mlflow_server, "promote", MODEL, "--from-alias", "candidate", "--to", "champion",
                      "--if-better", "ema/val_acc", "--json")  # fmt: skip
        assert promote.returncode == 0, promote.stderr
        yield {
            "uri": mlflow_server, "workdir": workdir, "tuned": set(tuned),
            "average": json.loads(average.stdout), "promote": json.loads(promote.stdout),
        }  # fmt: skip
    finally:
        _SESSION.reset()
        os.chdir(old_cwd)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
        mlflow.set_tracking_uri(None)


def _experiment_id(name: str) -> str:
    return mlflow.get_experiment_by_name(name).experiment_id


def test_checkpoints_reach_the_server_not_a_local_store(sweep):
    mlflow.set_tracking_uri(sweep["uri"])
    models = mlflow.search_logged_models(experiment_ids=[_experiment_id("http")], output_format="list")
    assert {m.source_run_id for m in models} >= sweep["tuned"]
    assert {m.status.name for m in models} == {"READY"}
    assert all(m.artifact_location.startswith("mlflow-artifacts:/") for m in models)  # proxied
    assert not (sweep["workdir"] / "mlflow.db").exists() and not (sweep["workdir"] / "mlruns").exists()


def test_registry_holds_the_promoted_soup(sweep, tmp_path):
    client = mlflow.MlflowClient(tracking_uri=sweep["uri"], registry_uri=sweep["uri"])
    (version,) = client.search_model_versions(f"name='{MODEL}'")
    assert {a: client.get_model_version_by_alias(MODEL, a).version for a in ("candidate", "champion")} == {
        "candidate": version.version, "champion": version.version,
    }  # fmt: skip
    assert sweep["promote"]["promoted"] is True and sweep["promote"]["version"] == str(version.version)
    sources = json.loads(version.tags["mlflow_ema.sources"])
    assert {s["run_id"] for s in sources} == sweep["tuned"]
    assert [s["run_id"] for s in sources] == [m["run_id"] for m in sweep["average"]["members"]]
    assert version.tags["mlflow_ema.promoted_to"] == "champion"
    # The version's sha256 tag is that of the averaged weights the soup run stored.
    weights = mlflow.artifacts.download_artifacts(
        artifact_uri=f"runs:/{version.run_id}/soup/model.safetensors", dst_path=str(tmp_path),
        tracking_uri=sweep["uri"],
    )  # fmt: skip
    assert hashlib.sha256(Path(weights).read_bytes()).hexdigest() == version.tags["mlflow_ema.sha256"]
    soup_run = client.get_run(version.run_id)
    assert soup_run.data.metrics["ema/val_acc"] == pytest.approx(sweep["average"]["soup_value"])


def test_champion_loads_and_scores_like_the_recorded_soup(sweep):
    from examples.train_digits import val_accuracy

    mlflow.set_tracking_uri(sweep["uri"])
    model = mlflow_ema.load_model(f"models:/{MODEL}@champion")  # its .eval() is harmless
    assert val_accuracy(model) == pytest.approx(sweep["average"]["soup_value"])


def test_mlflow_models_predict_serves_the_champion(sweep, tmp_path, digits):
    x, _ = digits
    batch = x[:16]
    (tmp_path / "input.json").write_text(
        json.dumps({"dataframe_split": {"columns": [f"p{i}" for i in range(64)], "data": batch.tolist()}})
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": sweep["uri"]}
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", f"models:/{MODEL}@champion",
         "--env-manager", "local", "-i", str(tmp_path / "input.json"), "-t", "json",
         "-o", str(tmp_path / "output.json")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    served = json.loads((tmp_path / "output.json").read_text())["predictions"]
    rows = [list(r.values()) if isinstance(r, dict) else r for r in served]
    mlflow.set_tracking_uri(sweep["uri"])
    with torch.no_grad():
        expected = mlflow.pytorch.load_model(f"models:/{MODEL}@champion")(batch)
    torch.testing.assert_close(torch.tensor(rows, dtype=torch.float32), expected)
