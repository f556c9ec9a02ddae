"""The digits example end to end on a real MLflow sqlite store."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import mlflow

import mlflow_ema
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
    assert "mlflow_ema.model_factory" not in run.data.tags  # zero-config: the architecture is a program
    artifacts = {
        a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "mlflow_ema/architecture")
    }
    assert artifacts == {"mlflow_ema/architecture/inputs.json", "mlflow_ema/architecture/program.pt2"}
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


def test_main_job_twice_in_one_folder(tracking, capsys):
    """The quick start's main job, shortened: pretrain, sweep, uniform and greedy soups,
    register, promote, load the champion. A second run in the same folder adds versions
    and leaves the first run's untouched."""
    import mlflow.pytorch

    from examples.digits_soup import main
    from examples.train_digits import test_accuracy

    client = mlflow.MlflowClient()
    job = ["--base-epochs", "2", "--epochs", "2"]
    main(job)
    first = capsys.readouterr().out
    assert sorted(str(v.version) for v in client.search_model_versions("name='digits-soup'")) == ["1", "2"]
    assert str(client.get_model_version_by_alias("digits-soup", "candidate").version) == "2"
    before = {str(v.version): (v.run_id, v.tags) for v in client.search_model_versions("name='digits-soup'")}

    main(job)
    second = capsys.readouterr().out
    versions = {str(v.version): v for v in client.search_model_versions("name='digits-soup'")}
    assert sorted(versions) == ["1", "2", "3", "4"]
    for number, (run_id, tags) in before.items():  # nothing clobbered
        assert (versions[number].run_id, {k: versions[number].tags[k] for k in tags}) == (run_id, tags)

    # Each soup averages its own sweep only: members share their run's init_from.
    def bases(version) -> set[str]:
        members = json.loads(version.tags["mlflow_ema.sources"])
        return {mlflow.get_run(m["run_id"]).data.params["init_from"] for m in members}

    (base_1,), (base_2,) = bases(versions["1"]), bases(versions["3"])
    assert base_1 != base_2 and bases(versions["2"]) == {base_1} and bases(versions["4"]) == {base_2}
    runs = mlflow.search_runs(experiment_names=["digits"], output_format="list")
    soups = mlflow.search_runs(experiment_names=["digits-soups"], output_format="list")
    assert [r.info.run_name for r in runs if r.info.run_name.startswith(("base", "soup"))] == ["base"] * 2
    assert sorted(r.info.run_name.split("-")[0] for r in soups) == ["posthoc"] * 2 + ["soup"] * 4
    for run in soups:  # the post-hoc EMA table's run: its scores and its choice
        if run.info.run_name.startswith("posthoc-ft-"):
            assert "chosen_sigma_rel" in run.data.metrics and "ema/val_acc/sigma_rel_0.08" in run.data.metrics
    assert sum(r.info.run_name.startswith("ft-") for r in runs) == 12

    # The table's champion row is what models:/digits-soup@champion loads.
    champion = client.get_model_version_by_alias("digits-soup", "champion")
    accuracy = test_accuracy(mlflow_ema.load_model("models:/digits-soup@champion"))
    for out in (first, second):
        assert "best single run, raw weights" in out and "greedy soup" in out and "uniform soup" in out

    (row,) = [line for line in second.splitlines() if line.endswith("<- models:/digits-soup@champion")]
    assert f"digits-soup version {champion.version} " in row
    assert row.split()[-3] == f"{accuracy:.4f}"
