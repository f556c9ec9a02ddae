"""The digits example end to end on a real MLflow sqlite store."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import mlflow
import pytest

from mlflow_ema import load_checkpoint

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


@pytest.fixture
def sqlite_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_train_digits_logs_metrics_and_checkpoints(sqlite_store, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--epochs", "3", "--experiment", "digits-test"])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "EMA acc" in out

    runs = mlflow.search_runs(experiment_names=["digits-test"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val_acc"] > 0.8 and run.data.metrics["ema/val_acc"] > 0.8
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="checkpoints", dst_path=str(tmp_path / "dl")
    )
    raw = load_checkpoint(Path(local) / "raw")
    ema = load_checkpoint(Path(local) / "ema")
    assert raw.manifest.kind == "raw" and ema.manifest.kind == "ema"
    assert raw.manifest.init_fingerprint == ema.manifest.init_fingerprint
    assert ema.manifest.step == raw.manifest.step > 0
    assert set(raw.state_dict) == set(ema.state_dict)
