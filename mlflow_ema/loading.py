"""Loading what mlflow-ema recorded, from a folder or an MLflow URI, without pickle.

=================================  =====================================================
``load_checkpoint(...)`` takes     what it reads
=================================  =====================================================
a local folder                     the checkpoint folder itself
``models:/<model_id>``             a checkpoint LoggedModel of a run (``raw-step<N>``...)
``models:/NAME@ALIAS``,            a soup registered by ``mlflow-ema average``: the
``models:/NAME/VERSION``           ``soup/`` checkpoint of its run, whose weights must
                                   match the version's ``mlflow_ema.sha256`` tag
``runs:/<run_id>/<path>`` and      the checkpoint folder at that artifact URI
other artifact URIs
=================================  =====================================================

Everything is downloaded to a temporary folder, verified (sha256 of every file against
the manifest) and read as safetensors; the folder is gone when the call returns.

:func:`load_model` returns a module instead, without the user's code: the architecture
program the run recorded (:mod:`mlflow_ema.programs`) holding a checkpoint's weights, or a
registered version in MLflow's pt2 format; a pickle only with ``allow_pickle=True``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from mlflow_ema.checkpoint import Checkpoint, weights_digest
from mlflow_ema.checkpoint import load_checkpoint as load_checkpoint_folder
from mlflow_ema.errors import CheckpointError
from mlflow_ema.tags import TAG_SHA256

URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "wasbs://", "hdfs://", "dbfs:/")


def is_uri(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and location.startswith(URI_SCHEMES)


def load_checkpoint(
    location: str | os.PathLike, *, device: str | torch.device = "cpu", verify: bool = True
) -> Checkpoint:
    """``(state_dict, manifest)`` of the checkpoint at ``location``: a folder or a URI (see
    the module docstring). Tied weights come back as shared tensors."""
    if not is_uri(location):
        return load_checkpoint_folder(location, device=device, verify=verify)
    with tempfile.TemporaryDirectory(prefix="mlflow-ema-load-") as tmp:
        folder, expected = download_checkpoint(str(location), Path(tmp))
        checkpoint = load_checkpoint_folder(folder, device=device, verify=verify)
    if expected is not None and weights_digest(checkpoint.manifest) != expected:
        raise CheckpointError(f"{location}: the soup's weights do not match the version's {TAG_SHA256} tag")
    return checkpoint


def load_state_dict(
    location: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The weights at ``location`` (a folder or a URI, as :func:`load_checkpoint` takes),
    to load into a module you build yourself: ``model.load_state_dict(load_state_dict(uri))``."""
    return load_checkpoint(location, device=device).state_dict


def load_model(uri: str, *, allow_pickle: bool = False) -> torch.nn.Module:
    """A module holding the weights ``uri`` names, in eval mode, without your code:

    - ``models:/<model_id>``, a checkpoint of a run that recorded its architecture: that
      program with the checkpoint's (verified) weights;
    - ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (or a local MLflow model folder),
      a registered version: its pt2 program, checked to be pickle-free before loading.
      A version written as a pickle (mlflow-ema < 0.4, or ``--serialization pickle``) runs
      code from the file when loaded: only with ``allow_pickle=True``.

    The module is a thin wrapper around the exported program: ``train()`` / ``eval()`` only
    set its flag, and ``state_dict()`` uses the original model's names."""
    from mlflow_ema.programs import load_program

    with tempfile.TemporaryDirectory(prefix="mlflow-ema-model-") as tmp:
        if str(uri).startswith("models:/m-"):
            from mlflow_ema.architecture import load_weights

            program = _checkpoint_program(str(uri), Path(tmp))
            module = load_program(program)
            load_weights(module, load_checkpoint(uri).state_dict, what=f"the weights of {uri}")
            return module.eval()
        folder = _model_folder(str(uri), Path(tmp))
        if (folder / "data" / "model.pt2").is_file():
            return load_program(folder / "data" / "model.pt2").eval()
        if not (folder / "data" / "model.pth").is_file():
            raise CheckpointError(f"{uri} holds no pytorch model (no data/model.pt2 nor data/model.pth)")
        if not allow_pickle:
            raise CheckpointError(
                f"{uri} is a pickle (registered by mlflow-ema < 0.4 or with --serialization pickle): loading it "
                "runs code from the file and needs the model's code importable; pass allow_pickle=True if you "
                "trust its source"
            )
        import mlflow

        return mlflow.pytorch.load_model(str(folder)).eval()


def _model_folder(uri: str, dst: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    if not is_uri(uri):
        if not (Path(uri) / "MLmodel").is_file():
            raise CheckpointError(f"{uri} is not an MLflow model folder (no MLmodel file)")
        return Path(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as e:
        raise CheckpointError(f"{uri}: {e.message.splitlines()[0] if e.message else e.error_code}") from None


def _checkpoint_program(uri: str, dst: Path) -> Path:
    """The architecture program the run of checkpoint ``models:/<model_id>`` recorded."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from mlflow_ema.programs import PROGRAM_FILE, checkpoint_model_name
    from mlflow_ema.soup_model import download_architecture
    from mlflow_ema.tags import RUN_TAG_ARCHITECTURE_ERROR, TAG_KIND

    client = mlflow.MlflowClient()
    try:
        logged = client.get_logged_model(uri.removeprefix("models:/"))
    except MlflowException as e:
        raise CheckpointError(f"{uri}: no such checkpoint ({e.error_code})") from None
    run_id = logged.source_run_id
    name = checkpoint_model_name(logged.name, logged.tags.get(TAG_KIND, ""))
    folder = download_architecture(run_id, name, dst) if run_id else None
    if folder is None or not (folder / PROGRAM_FILE).is_file():
        why = (client.get_run(run_id).data.tags.get(RUN_TAG_ARCHITECTURE_ERROR) if run_id else None) or (
            "trained with mlflow-ema < 0.4"
        )
        raise CheckpointError(
            f"{uri}: its run recorded no architecture program ({why}); build the model yourself and load "
            f"mlflow_ema.load_state_dict({uri!r}) into it"
        )
    return folder / PROGRAM_FILE


def download_checkpoint(uri: str, dst: Path) -> tuple[Path, str | None]:
    """Download the checkpoint folder ``uri`` names into ``dst``; returns it and, for a
    registered soup, the sha256 its version recorded."""
    import mlflow

    expected = None
    if uri.startswith("models:/") and not uri.removeprefix("models:/").startswith("m-"):
        uri, expected = _registered_soup(uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    return local, expected


def _registered_soup(uri: str) -> tuple[str, str]:
    """``runs:/<soup run>/soup`` and the sha256 tag of the version ``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION`` names."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, sep, which = uri.removeprefix("models:/").rpartition("@")
    client = MlflowClient()
    try:
        if sep:
            version = client.get_model_version_by_alias(name, which)
        else:
            name, _, number = uri.removeprefix("models:/").rpartition("/")
            version = client.get_model_version(name, number)
    except MlflowException as e:
        raise CheckpointError(f"{uri}: no such registered model version ({e.error_code})") from None
    if TAG_SHA256 not in version.tags or not version.run_id:
        raise CheckpointError(f"{uri} was not registered by mlflow-ema average: it holds no soup checkpoint")
    return f"runs:/{version.run_id}/soup", version.tags[TAG_SHA256]
