"""Registering a soup writes its weights once per copy MLflow needs: the run's ``soup/``
checkpoint goes straight into a local store (staged, then renamed), is uploaded only to
other stores, and a failure while writing it leaves nothing half-made either way. The
program the weights go into takes the soup's tensors, not a copy of them."""

from __future__ import annotations

import errno
from pathlib import Path

import mlflow
import pytest
import test_bad_input
import torch
from mlflow import MlflowClient
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from test_bad_input import AVERAGE, one_error, soup_runs
from torch import nn

import mlflow_ema
import mlflow_ema.checkpoint as checkpoint
import mlflow_ema.programs as programs
import mlflow_ema.registry as registry
from mlflow_ema.architecture import load_weights
from mlflow_ema.inputs import describe_inputs

cli = test_bad_input.cli  # the fixture: the click app on the shared sweep, registry emptied after


def _artifact_folder(run) -> Path:
    return Path(run.info.artifact_uri.removeprefix("file://"))


def test_a_local_store_gets_the_soup_checkpoint_written_in_place(cli, monkeypatch):
    uploads = []
    upload = LocalArtifactRepository.log_artifacts
    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts",
                        lambda self, local_dir, artifact_path=None: uploads.append(artifact_path)
                        or upload(self, local_dir, artifact_path))  # fmt: skip
    before = {r.info.run_id for r in soup_runs(3)}
    cli(*AVERAGE, "--register-as", "soup")
    assert "soup" not in uploads and uploads  # the model folder is still MLflow's own upload
    (run,) = [r for r in soup_runs() if r.info.run_id not in before]
    folder = _artifact_folder(run)
    assert sorted(p.name for p in folder.iterdir()) == ["soup", "soup.png"]  # no staging folder left
    (version,) = MlflowClient().search_model_versions(f"run_id = '{run.info.run_id}'")
    uri = f"models:/soup/{version.version}"
    soup = mlflow_ema.load_checkpoint(uri)  # verified against the version's sha256 tag
    assert checkpoint.weights_digest(soup.manifest) == version.tags["mlflow_ema.sha256"]
    assert mlflow.pytorch.load_model(uri) is not None


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
    before = {r.info.run_id for r in soup_runs(3)}
    line = one_error(cli(*AVERAGE, "--register-as", "soup", "--alias", "candidate", code=1))
    assert "No space left on device" in line and "deleted the soup run" in line
    assert "nothing was registered" in line and "failed" not in line.split(";", 1)[1]  # clean-up went well
    assert MlflowClient().search_registered_models() == []
    (left,) = [r for r in soup_runs(3) if r.info.run_id not in before]
    assert left.info.lifecycle_stage == "deleted" and left.data.tags["mlflow_ema.incomplete"] == "true"
    folder = _artifact_folder(left)
    assert not list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.partial"))


# -- the program the soup's weights go into -------------------------------------------------------


def _program(tmp_path: Path) -> tuple[nn.Module, programs.ExportedModule]:
    """A model with a BatchNorm (buffers too) and its program saved without weights, loaded back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10)).eval()
    model[1].running_mean.uniform_()
    spec = describe_inputs((torch.randn(4, 64),), {}, model_class="tests:model")
    programs.save_program(programs.export_model(model, spec), tmp_path / "program.pt2", weights=False)
    return model, programs.load_program(tmp_path / "program.pt2")


def test_a_program_is_loaded_with_placeholders_and_copies_weights_into_them(tmp_path):
    model, module = _program(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 64)
    assert torch.equal(module(x), torch.zeros(5, 10))  # placeholders are zeros, and run
    load_weights(module, state)
    assert torch.equal(module(x), model(x))
    state["3.bias"] += 1  # copied: the module does not follow its source
    assert torch.equal(module(x), model(x))


def test_by_reference_takes_the_tensors_and_converts_another_dtype(tmp_path):
    model, module = _program(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"] = state["0.weight"].double()
    with programs.by_reference(module):
        load_weights(module, state)
    own = module.state_dict()
    assert own["3.weight"].data_ptr() == state["3.weight"].data_ptr()  # no second copy
    assert own["1.running_mean"].data_ptr() == state["1.running_mean"].data_ptr()
    assert own["0.weight"].dtype == torch.float32  # the program's dtype stays
    x = torch.randn(5, 64)
    assert torch.allclose(module(x), model(x))
    assert not module.by_reference
    load_weights(module, {k: v.clone() for k, v in model.state_dict().items()})  # copies again afterwards
    assert own["3.weight"].data_ptr() == module.state_dict()["3.weight"].data_ptr()
