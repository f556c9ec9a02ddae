"""The digits example end to end on a real MLflow sqlite store."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import mlflow

from mlflow_ema import init_fingerprint, load_checkpoint

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


def checkpoints(experiment: str) -> list:
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    return mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")


def fetch(model, tmp_path: Path):
    dst = tmp_path / model.model_id
    dst.mkdir()
    return load_checkpoint(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model.model_id}", dst_path=str(dst))
    )


def test_train_digits_logs_metrics_and_checkpoints(tracking, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--epochs", "3", "--experiment", "digits-test"])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert "EMA acc" in capsys.readouterr().out

    (run,) = mlflow.search_runs(experiment_names=["digits-test"], output_format="list")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val_acc"] > 0.8 and run.data.metrics["ema/val_acc"] > 0.8
    assert run.data.tags["mlflow_ema.model_factory"] == "examples.train_digits:build_model"
    last = {
        m.tags["mlflow_ema.kind"]: m for m in checkpoints("digits-test") if m.tags["mlflow_ema.epoch"] == "3"
    }
    raw, ema = fetch(last["raw"], tmp_path), fetch(last["ema"], tmp_path)
    assert raw.manifest.kind == "raw" and ema.manifest.kind == "ema"
    assert raw.manifest.init_fingerprint == ema.manifest.init_fingerprint
    assert ema.manifest.step == raw.manifest.step > 0
    assert set(raw.state_dict) == set(ema.state_dict)
    assert {m.key for m in last["ema"].metrics} == {"ema/val_acc"}


def test_train_digits_starts_from_a_logged_checkpoint(tracking, tmp_path):
    from examples.train_digits import main

    main(["--epochs", "1", "--experiment", "base"])
    base = next(m for m in checkpoints("base") if m.tags["mlflow_ema.kind"] == "raw")
    main(
        ["--epochs", "1", "--experiment", "tuned", "--init-from", f"models:/{base.model_id}", "--lr", "0.01"]
    )
    # Fine-tuned from the base: the init fingerprint is the base's parameters, not a fresh init.
    weights = fetch(base, tmp_path).state_dict
    params = {k: v for k, v in weights.items() if "running" not in k and "num_batches" not in k}
    assert {m.tags["mlflow_ema.init_fingerprint"] for m in checkpoints("tuned")} == {init_fingerprint(params)}
