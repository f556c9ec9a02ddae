"""Registering a soup writes its weights once per copy MLflow needs: the run's ``soup/``
checkpoint goes straight into a local store (staged, then renamed), is uploaded only to
other stores, and a failure while writing it leaves nothing half-made either way."""

from __future__ import annotations

import errno
from pathlib import Path

import mlflow
import pytest
from helpers import run_cli
from mlflow import MlflowClient
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

import mlflow_ema
import mlflow_ema.checkpoint as checkpoint
import mlflow_ema.registry as registry

AVERAGE = ("average", "-e", "sweep", "--top-k", "2")


@pytest.fixture
def cli(small_sweep, tmp_path, monkeypatch):
    """The click app in-process on the shared sweep; soups and registered models removed after."""
    _, uri = small_sweep
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EMA_TRUST_MODULES", "helpers")
    mlflow.set_tracking_uri(uri)
    yield run_cli
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    for model in client.search_registered_models():
        client.delete_registered_model(model.name)
    for run in _soup_runs():
        client.delete_run(run.info.run_id)
    mlflow.set_tracking_uri(None)


def _soup_runs(view: int = 1) -> list:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("sweep-soups")
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id], "attributes.run_name LIKE 'soup-%'", run_view_type=view
    )


def _one_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mlflow-ema: error: "), output
    return lines[0]


def _artifact_folder(run) -> Path:
    return Path(run.info.artifact_uri.removeprefix("file://"))


def test_a_local_store_gets_the_soup_checkpoint_written_in_place(cli, monkeypatch):
    uploads = []
    upload = LocalArtifactRepository.log_artifacts
    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts",
                        lambda self, local_dir, artifact_path=None: uploads.append(artifact_path)
                        or upload(self, local_dir, artifact_path))  # fmt: skip
    cli(*AVERAGE, "--register-as", "soup")
    assert "soup" not in uploads and uploads  # the model folder is still MLflow's own upload
    (run,) = _soup_runs()
    folder = _artifact_folder(run)
    assert sorted(p.name for p in folder.iterdir()) == ["soup", "soup.png"]  # no staging folder left
    version = MlflowClient().get_model_version("soup", "1")
    soup = mlflow_ema.load_checkpoint("models:/soup/1")  # verified against the version's sha256 tag
    assert checkpoint.weights_digest(soup.manifest) == version.tags["mlflow_ema.sha256"]
    assert mlflow.pytorch.load_model("models:/soup/1") is not None


def _full_disk_after_writing(save):
    """``save_checkpoint`` that writes, then finds the disk full (at its last fsync, say)."""

    def full_disk(path, *args, **kwargs):
        save(path, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    return full_disk


@pytest.mark.parametrize("local", [True, False], ids=["written-in-place", "uploaded"])
def test_a_full_disk_while_writing_the_soup_leaves_no_run_and_no_model(cli, monkeypatch, local):
    """In place: the store's disk fills as the checkpoint is written there. Uploaded (a store
    that is not local): the upload fails after a truncated file."""
    if local:
        monkeypatch.setattr(registry, "save_checkpoint", _full_disk_after_writing(registry.save_checkpoint))
    else:

        def full_disk(self, local_dir, artifact_path=None):
            source = next(Path(local_dir).glob("*.safetensors"))
            target = Path(self.artifact_dir) / (artifact_path or "") / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes()[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(registry, "_local_artifact_dir", lambda: None)
        monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", full_disk)
    before = {r.info.run_id for r in _soup_runs(3)}
    line = _one_error(cli(*AVERAGE, "--register-as", "soup", "--alias", "candidate", code=1))
    assert "No space left on device" in line and "deleted the soup run" in line
    assert "nothing was registered" in line and "failed" not in line.split(";", 1)[1]  # clean-up went well
    assert MlflowClient().search_registered_models() == []
    (left,) = [r for r in _soup_runs(3) if r.info.run_id not in before]
    assert left.info.lifecycle_stage == "deleted" and left.data.tags["mlflow_ema.incomplete"] == "true"
    folder = _artifact_folder(left)
    assert not list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.partial"))
