"""The checkpoint format: a folder with the weights as safetensors and a JSON manifest.

::

    <checkpoint>/
        model.safetensors   the tensors, keyed as model.state_dict(); never pickle
        manifest.json       what the weights are (see Manifest) and the sha256 of each file
        training_state.pt   optional: optimizer, scheduler, EMA and RNG state for resuming,
                            written with torch.save and read only with weights_only=True

A checkpoint is written into a temporary folder beside its destination and
renamed into place when complete, so a crash never leaves a half-written one.
Loading checks each file's size and sha256 against the manifest first.

Tied weights (one tensor under several names, which safetensors refuses to
store twice) are stored once; the manifest's ``aliases`` maps every other name
to the stored one and loading restores them as one shared tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mlflow_ema._version import __version__
from mlflow_ema.errors import CheckpointError, ChecksumMismatchError

FORMAT = "mlflow-ema-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
TRAINING_STATE_FILE = "training_state.pt"
KINDS = ("raw", "ema", "soup")
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json``."""

    kind: str  # "raw" (the trained weights), "ema" (the moving average) or "soup" (averaged runs)
    files: dict[str, dict[str, Any]]  # file name -> {"sha256": hex, "bytes": size}
    num_tensors: int  # stored tensors (aliases not counted)
    num_parameters: int  # their total number of elements
    dtypes: dict[str, int]  # dtype name -> number of stored tensors
    all_finite: bool  # False flags NaN/inf weights, which averaging refuses
    step: int | None = None
    epoch: int | None = None
    ema_decay: float | None = None  # decay of the last EMA update
    ema_updates: int | None = None  # averaging updates the EMA had made
    init_fingerprint: str | None = None  # see init_fingerprint()
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    created_by: str = f"mlflow-ema {__version__}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "manifest") -> Manifest:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise CheckpointError(f"{source} is not an mlflow-ema checkpoint manifest")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source} has checkpoint format {version!r}; this mlflow-ema {__version__} "
                f"reads format {FORMAT_VERSION} and older: upgrade mlflow-ema"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise CheckpointError(f"{source} is incomplete: {e}") from None
        if manifest.kind not in KINDS:
            raise CheckpointError(f"{source} has unknown kind {manifest.kind!r}")
        for name in manifest.files:
            if Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(f"{source} names a file outside the checkpoint: {name!r}")
        return manifest


class Checkpoint(NamedTuple):
    state_dict: dict[str, torch.Tensor]
    manifest: Manifest


def init_fingerprint(state_dict: Mapping[str, Any]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors.

    :class:`mlflow_ema.EMA` takes it over the model's parameters when it is built
    (before the first update): it tells whether two runs started from the same
    weights, and averaging runs that did not gives garbage.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        digest.update(_as_bytes(tensor))
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    *,
    kind: str,
    step: int | None = None,
    epoch: int | None = None,
    ema_decay: float | None = None,
    ema_updates: int | None = None,
    init_fingerprint: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    training_state: Mapping[str, Any] | None = None,
) -> Manifest:
    """Write ``state_dict`` as a checkpoint folder at ``path``, which must not exist yet.

    Tensors on other devices are copied to the CPU. ``training_state`` (optimizer,
    scheduler, EMA state...: tensors and plain Python values) goes to
    ``training_state.pt``. Returns the manifest written.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"{path} already exists: checkpoints are never overwritten")
    tensors, aliases = _unshare(state_dict)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        # one metadata key: safetensors writes them in hash order, which would make the file differ from run to run
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        files = [WEIGHTS_FILE]
        if training_state is not None:
            torch.save(dict(training_state), staging / TRAINING_STATE_FILE)
            files.append(TRAINING_STATE_FILE)
        dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
        manifest = Manifest(
            kind=kind,
            files={name: _file_digest(staging / name) for name in files},
            num_tensors=len(tensors),
            num_parameters=sum(t.numel() for t in tensors.values()),
            dtypes=dict(sorted(dtypes.items())),
            all_finite=all(_finite(t) for t in tensors.values()),
            step=step,
            epoch=epoch,
            ema_decay=ema_decay,
            ema_updates=ema_updates,
            init_fingerprint=init_fingerprint,
            aliases=aliases,
            metadata=dict(metadata or {}),
        )
        (staging / MANIFEST_FILE).write_text(manifest.to_json())
        for file in staging.iterdir():
            _fsync(file)
        _fsync(staging)
        os.rename(staging, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of the checkpoint at ``path``, without reading the weights."""
    path = Path(path)
    file = path / MANIFEST_FILE
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    if not file.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST_FILE}: not an mlflow-ema checkpoint")
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None
    return Manifest.from_dict(data, source=str(file))


def verify_checkpoint(path: str | os.PathLike) -> Manifest:
    """Check every file's size and sha256 against the manifest; returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, expected in manifest.files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"{file} has {size} bytes, the manifest records {expected['bytes']}: truncated or replaced"
            )
        actual = _file_digest(file)["sha256"]
        if actual != expected["sha256"]:
            raise ChecksumMismatchError(
                f"{file} sha256 {actual[:12]}... does not match the manifest's "
                f"{expected['sha256'][:12]}...: the file is corrupt or was modified"
            )
    return manifest


def load_checkpoint(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", verify: bool = True
) -> Checkpoint:
    """Load a checkpoint's state dict (tied weights restored as shared tensors) and manifest.

    With ``verify`` (the default) the files' sizes and sha256 are checked first.
    """
    path = Path(path)
    manifest = verify_checkpoint(path) if verify else read_manifest(path)
    file = path / WEIGHTS_FILE
    try:
        tensors = load_file(file, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None
    for alias, target in manifest.aliases.items():
        if target not in tensors:
            raise CheckpointError(f"{path}: alias {alias!r} points to missing tensor {target!r}")
        tensors[alias] = tensors[target]
    return Checkpoint(tensors, manifest)


def load_training_state(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """The ``training_state`` saved with a checkpoint, read with ``weights_only=True``."""
    path = Path(path)
    manifest = verify_checkpoint(path) if verify else read_manifest(path)
    if TRAINING_STATE_FILE not in manifest.files:
        raise CheckpointError(f"{path} holds no training state (log it with log_training_state=True)")
    try:
        return torch.load(path / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError here
        raise CheckpointError(f"{path / TRAINING_STATE_FILE} cannot be read safely: {e}") from None


def _unshare(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors that share no memory (as safetensors requires), and the
    aliases of tied ones."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach()
        if tensor.numel():
            view = (
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tuple(tensor.stride()),
                tensor.dtype,
                tensor.device,
            )
            if view in seen:
                aliases[name] = seen[view]
                continue
            seen[view] = name
        tensor = tensor.cpu().contiguous()
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a view into a larger storage, e.g. one slice of a fused weight
        tensors[name] = tensor
    return tensors, aliases


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf, checked with numpy: save_checkpoint runs on the upload thread, where a
    torch op would start a second OpenMP team and slow every later training step."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.isfinite(tensor.numpy()).all())
    if tensor.dtype == torch.bfloat16:  # exponent bits all ones: inf or NaN
        return not bool((np.bitwise_and(tensor.view(torch.int16).numpy(), 0x7F80) == 0x7F80).any())
    return bool(torch.isfinite(tensor.float()).all())  # fp8: rare; stays correct


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def _file_digest(file: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "bytes": file.stat().st_size}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
