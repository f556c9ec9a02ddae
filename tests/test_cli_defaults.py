"""The CLI's defaults: the experiment when none is named, the soups' own experiment, an
unscored soup flagged, and the shared-init error the README shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import make_net, run_cli, train_steps
from mlflow import MlflowClient
from PIL import Image

import mlflow_ema
from mlflow_ema.tracking import _SESSION

README = Path(__file__).resolve().parents[1] / "README.md"


def one_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mlflow-ema: error: "), output
    return lines[0]


@pytest.fixture
def default_runs(tracking, digits, monkeypatch):
    """Runs ft-a and ft-b fine-tuned from one init, scratch from another, logged where autolog logs when the
    script sets no experiment: the Default experiment."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setenv("MLFLOW_EMA_TRUST_MODULES", "helpers")
    for name, value, seed in (("ft-a", 0.9, 0), ("ft-b", 0.8, 0), ("scratch", 0.7, 7)):
        model = make_net(seed=seed, hidden=16)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mlflow_ema.watch(model, opt)
        with mlflow.start_run(run_name=name):
            train_steps(model, opt, digits, 3)
            mlflow_ema.log_checkpoint(metrics={"ema/val_acc": value})
        _SESSION.reset()
    return tracking


def test_no_experiment_means_the_default_one_and_soups_get_their_own(default_runs, monkeypatch):
    client = MlflowClient()
    assert [r["run_name"] for r in json.loads(run_cli("ls", "--json"))] == ["ft-a", "ft-b", "scratch"]

    # scratch did not start from ft-a's weights: the one line the README shows
    line = one_error(run_cli("average", "--top-k", "3", "--register-as", "s", code=1))
    shown = re.sub(r"\([0-9a-f]{8}\)", "(<run id>)", line)
    assert "did not start from the same weights as run ft-a" in shown
    assert shown in README.read_text()

    out = json.loads(run_cli("average", "--top-k", "2", "--register-as", "s", "--json"))
    assert [m["run_name"] for m in out["members"]] == ["ft-a", "ft-b"] and out["scored"] is False
    soup_run = client.get_run(out["registered"]["run_id"])
    soups = client.get_experiment(soup_run.info.experiment_id)
    assert soups.name == "Default-soups"
    default = client.get_experiment("0").artifact_location
    assert soups.artifact_location.startswith(default.rsplit("/", 1)[0] + "/soups/")  # next to the sweep's
    # the sweep's experiment holds the sweep only: ls ranks it without a note about the soup
    text = run_cli("ls")
    assert "no READY" not in text and "soup-s" not in text

    # pointed at the soups, selection says what they are
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "Default-soups")
    assert "holds only soup runs (soup-s" in one_error(run_cli("ls", code=1))
    assert "is a soup run" in one_error(
        run_cli("average", "--run", soup_run.info.run_id, "--output", "x", code=1)
    )
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "nope")
    assert "unknown experiment 'nope' ($MLFLOW_EXPERIMENT_NAME)" in one_error(run_cli("ls", code=1))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "Default")
    assert len(json.loads(run_cli("ls", "--json"))) == 3


def test_an_unscored_soup_is_flagged_and_promote_if_better_refuses_it(default_runs, tmp_path):
    client = MlflowClient()
    args = ("average", "--filter", "attributes.run_name != 'scratch'", "--top-k", "2", "--register-as", "s")
    text = run_cli(*args, "--alias", "candidate")
    assert "mlflow-ema: note: the soup was not scored (averaged without --eval)" in text
    unscored = client.get_model_version_by_alias("s", "candidate")
    assert unscored.tags["mlflow_ema.scored"] == "false"
    chart = client.download_artifacts(unscored.run_id, "soup.png", str(tmp_path))
    assert "not scored" in Image.open(chart).text["Title"]
    line = one_error(
        run_cli("promote", "s", "--from-alias", "candidate", "--if-better", "ema/val_acc", code=1)
    )
    assert f"version {unscored.version} of 's' was not scored (averaged without --eval)" in line
    assert "champion" not in client.get_registered_model("s").aliases

    # scored, in an experiment of one's choice: promoted
    out = json.loads(
        run_cli(*args, "--eval", "helpers:digits_accuracy", "--soup-experiment", "mine", "--json")
    )
    assert out["scored"] is True and out["soup_value"] is not None
    version = out["registered"]["version"]
    assert client.get_model_version("s", version).tags["mlflow_ema.scored"] == "true"
    run = client.get_run(out["registered"]["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "mine"
    (tmp_path / "scored").mkdir()
    chart = client.download_artifacts(run.info.run_id, "soup.png", str(tmp_path / "scored"))
    assert "not scored" not in Image.open(chart).text["Title"]
    promoted = json.loads(
        run_cli("promote", "s", "--version", version, "--if-better", "ema/val_acc", "--json")
    )
    assert promoted["promoted"] is True

    # --soup-experiment is where a soup run goes: it needs one
    line = one_error(run_cli("average", "--top-k", "2", "--soup-experiment", "x", "--output", "o", code=1))
    assert "--soup-experiment needs --register-as" in line
