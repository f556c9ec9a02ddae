"""Checkpoints load as what they look like: by folder, by a run's ``models:/<model_id>``
and by a registered soup's ``models:/NAME@ALIAS``, without pickle."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from helpers import make_net
from mlflow import MlflowClient
from mlflow_ema.cli import main

import mlflow_ema
from mlflow_ema import AverageOptions, CheckpointError, average_runs
from mlflow_ema.checkpoint import load_checkpoint as load_folder


@pytest.fixture
def store(small_sweep, tmp_path, monkeypatch):
    _, uri = small_sweep
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    client = MlflowClient()
    for model in client.search_registered_models():
        client.delete_registered_model(model.name)
    mlflow.set_tracking_uri(None)


def checkpoints() -> list:
    experiment = mlflow.get_experiment_by_name("sweep").experiment_id
    return mlflow.search_logged_models(
        experiment_ids=[experiment], filter_string="tags.`mlflow_ema.kind` = 'ema'", output_format="list"
    )  # other tests' soups log models here too


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_runs_checkpoint_loads_by_its_models_uri(store):
    model = checkpoints()[0]
    state, manifest = mlflow_ema.load_checkpoint(f"models:/{model.model_id}")
    local = load_folder(model.artifact_location.removeprefix("file://"))
    assert same(state, local.state_dict) and manifest == local.manifest
    assert same(mlflow_ema.load_state_dict(f"models:/{model.model_id}"), local.state_dict)


def test_a_registered_soup_loads_by_alias_and_version(store, tmp_path):
    options = AverageOptions(experiments=["sweep"], top_k=2, register_as="soup", alias="candidate",
                             output=str(tmp_path / "soup"), trust_modules=["helpers"])  # fmt: skip
    average_runs(options)
    soup = load_folder(tmp_path / "soup").state_dict
    for uri in ("models:/soup@candidate", "models:/soup/1"):
        state, manifest = mlflow_ema.load_checkpoint(uri)
        assert same(state, soup) and manifest.kind == "soup"
    net = make_net(hidden=16)
    net.load_state_dict(mlflow_ema.load_state_dict("models:/soup@candidate"))  # the fine-tuning path
    out = CliRunner().invoke(main, ["inspect", "models:/soup@candidate", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["manifest"]["kind"] == "soup"


def test_what_is_not_a_checkpoint_is_one_clear_error(store):
    with pytest.raises(CheckpointError, match="no such registered model version"):
        mlflow_ema.load_state_dict("models:/nope@champion")
    run = mlflow.search_runs(experiment_names=["sweep"], output_format="list")[0]
    client = MlflowClient()
    client.create_registered_model("plain")
    client.create_model_version("plain", f"runs:/{run.info.run_id}/x", run_id=run.info.run_id)
    with pytest.raises(CheckpointError, match="was not registered by mlflow-ema average"):
        mlflow_ema.load_checkpoint("models:/plain/1")


def test_update_bn_needs_a_factory_and_a_factorys_module_registers_as_pt2(store, tmp_path):
    """The program runs in eval mode: --update-bn needs the real module, from a factory."""
    from helpers import run_cli

    args = (
        "average",
        "-e",
        "sweep",
        "--top-k",
        "2",
        "--update-bn",
        "helpers:digits_loader",
        "--register-as",
        "bn",
    )
    lines = [line for line in run_cli(*args, code=1).splitlines() if line.strip()]
    assert len(lines) == 1 and "--update-bn recomputes BatchNorm statistics" in lines[0], lines
    assert "--model-factory" in lines[0]
    run_cli(
        *args, "--model-factory", "helpers:make_net", "--model-kwargs", '{"hidden": 16}', "--alias", "new"
    )
    folder = Path(mlflow.artifacts.download_artifacts("models:/bn@new", dst_path=str(tmp_path)))
    assert (folder / "data" / "model.pt2").is_file() and not (folder / "data" / "model.pth").exists()
    loaded = mlflow_ema.load_model("models:/bn@new")
    soup = mlflow_ema.load_state_dict("models:/bn@new")
    assert same(loaded.state_dict(), soup)
    members = [mlflow_ema.load_state_dict(f"models:/{m.model_id}") for m in checkpoints()[:2]]
    assert not torch.equal(
        soup["1.running_mean"], (members[0]["1.running_mean"] + members[1]["1.running_mean"]) / 2
    )
