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
