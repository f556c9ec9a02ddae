"""The checkpoint format: a folder with the weights as safetensors and a JSON manifest.

::

    <checkpoint>/
        model.safetensors   the tensors, keyed as model.state_dict(); never pickle
        manifest.json       what the weights are (see Manifest) and the sha256 of each file
        training_state.pt   optional: optimizer, scheduler, EMA and RNG state for resuming,
                            written with torch.save and read only with weights_only=True

Weights larger than ``max_shard_size`` (default 5GB, as Hugging Face) are sharded the
Hugging Face way instead of ``model.safetensors``: ``model-00001-of-0000N.safetensors``...
plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map":
{tensor: file}}``), so HF tooling reads the folder. A tensor is never split; one larger than
the limit gets a shard of its own. Every file, shards and index included, is in the
manifest's ``files`` with its sha256. Format 2 introduced sharding; format 1 checkpoints
(always ``model.safetensors``) are read as before.

A checkpoint is written into a temporary folder beside its destination and
renamed into place when complete, so a crash never leaves a half-written one.
Loading checks each file's size and sha256 against the manifest first.

Tied weights (one tensor under several names, which safetensors refuses to
store twice) are stored once; the manifest's ``aliases`` maps every other name
to the stored one and loading restores them as one shared tensor.

Writing uses :func:`mlflow_ema.safetensors_writer.write_safetensors`: the bytes
``safetensors.torch.save_file`` writes, hashed while they are written. Every read of a safetensors file, by
:func:`load_checkpoint`, the averaging (:class:`WeightsReader`) and the merge of FSDP2
ranks' parts (:func:`iter_tensors`), goes through one reader, :class:`_SafetensorsFile`:
its header is bounded and checked before anything is allocated (see there for why not
the library's ``safe_open``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import reprlib
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from mlflow_ema._version import __version__
from mlflow_ema.errors import CheckpointError, ChecksumMismatchError
from mlflow_ema.safetensors_writer import write_safetensors
from mlflow_ema.sizes import DEFAULT_MAX_SHARD_SIZE, parse_size

FORMAT = "mlflow-ema-checkpoint"
FORMAT_VERSION = 2  # 2: the weights may be sharded (format 1: always model.safetensors)
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # sharded weights: the Hugging Face index
SHARD_FILE = "model-{:05d}-of-{:05d}.safetensors"
MANIFEST_FILE = "manifest.json"
TRAINING_STATE_FILE = "training_state.pt"
KINDS = ("raw", "ema", "soup", "posthoc")
# A forged length in a safetensors file's first 8 bytes would allocate up to 16 EB: refuse
# anything over the safetensors library's own limit before reading a byte of the header.
MAX_HEADER_BYTES = 100 * 10**6
# manifest.json and the index take kilobytes; a huge one is an attack or a broken disk.
MAX_JSON_BYTES = 64 * 10**6
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
_FINITE_CHUNK = 1 << 22  # elements checked for NaN/inf at a time
# The dtypes safetensors.torch itself reads (its _TYPES), by their names in a file's header.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "C64": torch.complex64,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
}  # fmt: skip
_ITEMSIZE = {name: dtype.itemsize for name, dtype in _DTYPES.items()}
_SHORT = reprlib.Repr()  # values quoted in errors: bounded, whatever their size
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = 4
_SHORT.maxlevel = 2


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json``."""

    kind: str  # "raw" (the trained weights), "ema" (the moving average), "soup" (averaged runs, a
    # post-hoc reconstruction) or "posthoc" (a snapshot of a power-function EMA)
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

    @property
    def sharded(self) -> bool:
        return INDEX_FILE in self.files

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "manifest") -> Manifest:
        """The manifest in ``data``, every field's type checked: a malformed one raises a
        one-line :class:`CheckpointError` naming ``source`` and the field."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise CheckpointError(f"{source} is not an mlflow-ema checkpoint manifest")
        version = data.get("format_version")
        if not _is_int(version) or version < 1:
            raise CheckpointError(f"{source}: format_version must be a positive integer, got {_got(version)}")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source} has checkpoint format {version!r}; this mlflow-ema {__version__} "
                f"reads format {FORMAT_VERSION} and older: upgrade mlflow-ema"
            )
        _check_fields(data, source)
        known = {f.name for f in dataclasses.fields(cls)}
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        _check_files(manifest.files, source)
        _check_layout(manifest, version, source)
        return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no count


def _is_count(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_dict_of(value: Any, ok: Callable[[Any], bool]) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and ok(v) for k, v in value.items())


def _or_none(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or ok(value)


def _got(value: Any) -> str:
    """``value`` for an error message: its JSON kind and a bounded, one-line repr."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    kind = "an object " if isinstance(value, dict) else "a list " if isinstance(value, list) else ""
    return kind + _SHORT.repr(value)


# Manifest field -> (check, what it must be); files' entries are checked by _check_files.
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "kind": (lambda v: isinstance(v, str) and v in KINDS, f"one of {', '.join(map(repr, KINDS))}"),
    "files": (lambda v: _is_dict_of(v, lambda _: True), "an object of file name -> {sha256, bytes}"),
    "num_tensors": (_is_count, "a non-negative integer"),
    "num_parameters": (_is_count, "a non-negative integer"),
    "dtypes": (lambda v: _is_dict_of(v, _is_count), "an object of dtype name -> number of tensors"),
    "all_finite": (lambda v: isinstance(v, bool), "true or false"),
    "step": (_or_none(_is_int), "an integer or null"),
    "epoch": (_or_none(_is_int), "an integer or null"),
    "ema_decay": (_or_none(_is_number), "a number or null"),
    "ema_updates": (_or_none(_is_int), "an integer or null"),
    "init_fingerprint": (_or_none(lambda v: isinstance(v, str)), "a string or null"),
    "aliases": (
        lambda v: _is_dict_of(v, lambda t: isinstance(t, str)),
        "an object of tensor name -> tensor name",
    ),
    "metadata": (lambda v: _is_dict_of(v, lambda _: True), "an object"),
    "created_by": (lambda v: isinstance(v, str), "a string"),
}


def _check_fields(data: Mapping[str, Any], source: str) -> None:
    for field in dataclasses.fields(Manifest):
        if field.name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise CheckpointError(f"{source} is incomplete: {field.name} is missing")
            continue
        rule = _FIELD_RULES.get(field.name)
        if rule is not None and not rule[0](data[field.name]):
            raise CheckpointError(f"{source}: {field.name} must be {rule[1]}, got {_got(data[field.name])}")


def _check_files(files: Mapping[str, Any], source: str) -> None:
    for name, entry in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{source} names a file outside the checkpoint: {_SHORT.repr(name)}")
        where = f"{source}: files[{_SHORT.repr(name)}]"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} must be an object with sha256 and bytes, got {_got(entry)}")
        sha256, size = entry.get("sha256"), entry.get("bytes")
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise CheckpointError(f"{where}.sha256 must be 64 lowercase hex digits, got {_got(sha256)}")
        if not _is_count(size):
            raise CheckpointError(f"{where}.bytes must be a non-negative integer, got {_got(size)}")


def _check_layout(manifest: Manifest, version: int, source: str) -> None:
    """The weights are ``model.safetensors`` or shards with their index, never both."""
    if manifest.sharded:
        if WEIGHTS_FILE in manifest.files:
            raise CheckpointError(f"{source} lists both {WEIGHTS_FILE} and sharded weights ({INDEX_FILE})")
        if version < 2:
            raise CheckpointError(f"{source} is checkpoint format {version}, which has no sharded weights")
        if not weight_files(manifest):
            raise CheckpointError(f"{source} lists {INDEX_FILE} but no shard")
    elif WEIGHTS_FILE not in manifest.files:
        raise CheckpointError(f"{source} lists no weights ({WEIGHTS_FILE} or {INDEX_FILE})")


class Checkpoint(NamedTuple):
    state_dict: dict[str, torch.Tensor]
    manifest: Manifest


def weight_files(manifest: Manifest) -> list[str]:
    """The files that hold the tensors: ``model.safetensors``, or the shards in order."""
    if not manifest.sharded:
        return [WEIGHTS_FILE]
    return sorted(name for name in manifest.files if name.endswith(".safetensors"))


def weights_digest(manifest: Manifest) -> str:
    """One sha256 that identifies a checkpoint's weights, from its manifest alone.

    ``model.safetensors``: that file's sha256 (as in format 1). Sharded weights: the sha256
    of the shards' ``sha256sum`` listing (``"<sha256>  <file>\\n"`` per shard, in file order),
    which ``sha256sum model-*-of-*.safetensors | sha256sum`` reproduces in the folder. The
    index is left out: the shards' headers name their tensors.
    """
    if not manifest.sharded:
        return manifest.files[WEIGHTS_FILE]["sha256"]
    listing = "".join(f"{manifest.files[name]['sha256']}  {name}\n" for name in weight_files(manifest))
    return hashlib.sha256(listing.encode()).hexdigest()


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
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
) -> Manifest:
    """Write ``state_dict`` as a checkpoint folder at ``path``, which must not exist yet.

    Tensors on other devices are copied to the CPU one shard at a time. ``training_state``
    (optimizer, scheduler, EMA state...: tensors and plain Python values) goes to
    ``training_state.pt``. When the tensors take more than ``max_shard_size`` bytes (an int,
    or ``"5GB"``, ``"500MB"``, ``"2GiB"``...; None: never), they are sharded (see the module
    docstring): tensors go to shards in the natural order of their names (``blocks.2``
    before ``blocks.10``), a new shard starting when the next tensor would overflow this one,
    so the files depend only on the tensors, not on the dict's order. Beyond the state dict,
    writing needs memory for about one shard (CPU copies, tensors that share a larger
    storage). Returns the manifest written.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    limit = parse_size(max_shard_size)
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"{path} already exists: checkpoints are never overwritten")
    tensors, aliases = _unshare(state_dict)
    shards = _plan_shards(tensors, limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        files, all_finite = _write_weights(staging, tensors, shards)
        if training_state is not None:
            torch.save(dict(training_state), staging / TRAINING_STATE_FILE)
            files[TRAINING_STATE_FILE] = _file_digest(staging / TRAINING_STATE_FILE)
        dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
        manifest = Manifest(
            kind=kind,
            files=files,
            num_tensors=len(tensors),
            num_parameters=sum(t.numel() for t in tensors.values()),
            dtypes=dict(sorted(dtypes.items())),
            all_finite=all_finite,
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


def _write_weights(
    staging: Path, tensors: Mapping[str, torch.Tensor], shards: list[list[str]]
) -> tuple[dict[str, dict[str, Any]], bool]:
    """Write ``model.safetensors``, or the shards and their index, into ``staging``; returns
    the files' digests and whether every tensor is finite."""
    files: dict[str, dict[str, Any]] = {}
    weight_map: dict[str, str] = {}
    all_finite = True
    for i, names in enumerate(shards, 1):
        name = WEIGHTS_FILE if len(shards) == 1 else SHARD_FILE.format(i, len(shards))
        shard = {n: _cpu_copy(tensors[n]) for n in names}  # one shard on the CPU at a time
        # one metadata key, as safetensors writes several in hash order (files would differ run to run)
        files[name] = write_safetensors(staging / name, shard, metadata={"format": "pt"})
        all_finite = all_finite and all(_finite(t) for t in shard.values())
        del shard
        weight_map.update(dict.fromkeys(names, name))
    if len(shards) > 1:
        total = sum(_nbytes(t) for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files[INDEX_FILE] = _file_digest(staging / INDEX_FILE)
    return files, all_finite


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of the checkpoint at ``path``, without reading the weights."""
    path = Path(path)
    file = path / MANIFEST_FILE
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    if not file.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST_FILE}: not an mlflow-ema checkpoint")
    return Manifest.from_dict(_read_json(file), source=str(file))


def verify_checkpoint(path: str | os.PathLike) -> Manifest:
    """Check every file's size and sha256 against the manifest (in parallel threads), and that
    the weights' headers (and a sharded checkpoint's index) agree; returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    parallel_map(lambda item: check_file(path / item[0], item[1]), list(manifest.files.items()))
    WeightsReader(path, manifest).close()
    return manifest


def load_checkpoint(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", verify: bool = True
) -> Checkpoint:
    """Load a checkpoint's state dict (tied weights restored as shared tensors) and manifest,
    from ``model.safetensors`` or the shards. With ``verify`` (the default) the files' sizes
    and sha256 are checked first (as :func:`verify_checkpoint`). The tensors are read one at
    a time on the CPU through :class:`WeightsReader` and moved to ``device``."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        parallel_map(lambda item: check_file(path / item[0], item[1]), list(manifest.files.items()))
    tensors: dict[str, torch.Tensor] = {}
    with WeightsReader(path, manifest) as reader:  # headers bounded and checked, index against shards
        for f in reader.files.values():
            for name in f.in_file_order():  # sequential reads; errors name the file
                tensors[name] = f.read(name, 0, None, None, str(f.file)).to(device)
            f.close()  # one file open at a time
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


def check_file(file: Path, expected: Mapping[str, Any]) -> None:
    """``file`` exists and has the size and sha256 the manifest records."""
    check_size(file, expected)
    check_digest(file, expected, _file_digest(file)["sha256"])


def check_size(file: Path, expected: Mapping[str, Any]) -> None:
    """``file`` exists and has the size the manifest records (a cheap first check)."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    size = file.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(
            f"{file} has {size} bytes, the manifest records {expected['bytes']}: truncated or replaced"
        )


def check_digest(file: Path, expected: Mapping[str, Any], actual: str) -> None:
    """``actual``, the sha256 of ``file``, is the one the manifest records."""
    if actual != expected["sha256"]:
        raise ChecksumMismatchError(
            f"{file} sha256 {actual[:12]}... does not match the manifest's "
            f"{expected['sha256'][:12]}...: the file is corrupt or was modified"
        )


def parallel_map(fn: Callable[[Any], None], items: Iterable[Any]) -> None:
    """``fn`` on every item in parallel threads (sha256 is the slow part, ~1.2 GB/s a core, and
    hashlib releases the GIL); the first item's error in order is raised, the rest cancelled."""
    items = list(items)
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    pool = ThreadPoolExecutor(max_workers=max(1, min(len(items), os.cpu_count() or 1)))
    try:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_tensors(file: str | os.PathLike, *, label: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in one safetensors file, in the order of their data in
    the file, one read at a time (the caller keeps only what it needs), through the bounded, checked header parse of
    :class:`_SafetensorsFile`. ``label`` names the file in errors (default: its path)."""
    f = _SafetensorsFile(Path(file))
    try:
        for name in f.in_file_order():
            yield name, f.read(name, 0, None, None, label or str(file))
    finally:
        f.close()


class _SafetensorsFile:
    """One safetensors file: its header, parsed once, and positional reads into a buffer the
    caller owns. The file is opened on the first read and stays open until :meth:`close`.

    Every safetensors read of the package goes through it, not the library's ``safe_open``
    (nor ``load_file``, built on it), because:

    - ``safe_open`` memory-maps the file, and the touched pages stay resident: measured in
      this project at up to 3x a checkpoint's size when averaging 8 members of small tensors,
      even after madvise;
    - the streaming average (:mod:`mlflow_ema.soup`) reads slices of a tensor with positional
      reads into one reusable buffer it owns, where ``safe_open`` returns a new tensor per
      slice;
    - a header must be bounded (its length against the file and MAX_HEADER_BYTES) and every
      entry checked (dtype, shape, offsets inside the data) before anything is allocated,
      with a one-line :class:`CheckpointError` naming the file.
    """

    def __init__(self, file: Path) -> None:
        self.file = file
        self._fd: int | None = None
        self.entries, self.base = _read_header(file)  # name -> {"dtype", "shape", "data_offsets"}

    def in_file_order(self) -> list[str]:
        """The tensor names in the order of their data in the file (as ``load_file`` reads)."""
        return sorted(self.entries, key=lambda name: (self.entries[name]["data_offsets"][0], name))

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        entry = self.entries[name]
        return entry["dtype"], tuple(entry["shape"])

    def read(
        self, name: str, first: int, count: int | None, out: torch.Tensor | None, label: str
    ) -> torch.Tensor:
        entry = self.entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{label}: {name!r} has dtype {entry['dtype']}, which mlflow-ema cannot read"
            )
        whole = count is None
        if whole:
            start, end = entry["data_offsets"]
            count = (end - start) // dtype.itemsize - first
        out = torch.empty(count, dtype=dtype) if out is None else out
        self.read_into(
            name, first, memoryview(out.view(torch.uint8).numpy()) if count else memoryview(b""), label
        )
        return out.view(entry["shape"]) if whole else out

    def read_into(self, name: str, first: int, view: memoryview, label: str) -> None:
        """The bytes of ``name`` from its element ``first`` on, as many as ``view`` holds."""
        if self._fd is None:
            try:
                self._fd = os.open(self.file, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{label}: cannot open {self.file.name} ({e})") from None
        entry = self.entries[name]
        done, offset = 0, self.base + entry["data_offsets"][0] + first * _ITEMSIZE[entry["dtype"]]
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(
                    f"{label}: {name!r} ends early in {self.file.name}: the file is truncated"
                )
            done += n

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_header(file: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The checked tensor entries of a safetensors file's header, and where its data starts.
    The header's length is bounded by the file and MAX_HEADER_BYTES before anything is read."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{file} is not a readable safetensors file ({what})")

    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"{len(prefix)} bytes, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise bad(f"header length {length} bytes is over the limit of {MAX_HEADER_BYTES}")
            if length > size - 8:
                raise bad(f"header length {length} bytes runs past the end of the {size}-byte file")
            raw = f.read(length)
    except OSError as e:
        raise bad(str(e)) from None
    if len(raw) < length:
        raise bad("the file ends inside its header: truncated")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _Duplicate as e:
        raise bad(f"the header names {_SHORT.repr(e.args[0])} twice") from None
    except UnicodeDecodeError:
        raise bad("the header is not UTF-8") from None
    except (ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested too deep
        raise bad(f"the header is not valid JSON: {str(e) or type(e).__name__}") from None
    return _check_header(header, size - 8 - length, bad), 8 + length


def _check_header(
    header: Any, data_size: int, bad: Callable[[str], CheckpointError]
) -> dict[str, dict[str, Any]]:
    """The tensor entries, each with a string dtype, a shape of non-negative ints and data
    offsets inside the data; known dtypes' offsets hold exactly the shape's bytes."""
    if not isinstance(header, dict):
        raise bad(f"the header must be a JSON object, got {_got(header)}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not _is_dict_of(metadata, lambda v: isinstance(v, str)):
        raise bad(f"__metadata__ must be an object of strings, got {_got(metadata)}")
    for name, entry in header.items():
        _check_entry(_SHORT.repr(name), entry, data_size, bad)
    return header


def _check_entry(name: str, entry: Any, data_size: int, bad: Callable[[str], CheckpointError]) -> None:
    if not isinstance(entry, dict):
        raise bad(f"{name} must be an object with dtype, shape and data_offsets, got {_got(entry)}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"{name} has dtype {_got(dtype)}, not a string")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise bad(f"{name} has shape {_got(shape)}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise bad(f"{name} has data_offsets {_got(offsets)}, not two integers")
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        raise bad(f"{name} has data_offsets {_SHORT.repr(offsets)}, outside the {data_size} bytes of data")
    itemsize = _ITEMSIZE.get(dtype)  # unknown dtypes: refused on read, naming the dtype
    if itemsize is None:
        return
    numel = _numel_upto(shape, data_size)
    if numel * itemsize != end - start:
        takes = f"{numel * itemsize} bytes" if numel <= data_size else f"over the {data_size} bytes of data"
        raise bad(f"{name} is {dtype} {_SHORT.repr(shape)}, {takes}, but its data_offsets span {end - start}")


def _numel_upto(shape: list[int], limit: int) -> int:
    """The shape's number of elements, or ``limit + 1`` once past ``limit``: a forged shape
    of many huge dimensions would otherwise take long to multiply out."""
    if 0 in shape:
        return 0
    numel = 1
    for n in shape:
        numel *= n
        if numel > limit:
            return limit + 1
    return numel


class WeightsReader:
    """The tensors of a checkpoint in either layout, read tensor by tensor (or in slices)
    with positional reads, whichever file holds them. Opening it parses every header and
    checks a sharded checkpoint's index against the manifest and the shards: each tensor
    named once, every file the index names listed in the manifest, and each shard holding
    exactly the tensors the index maps to it. At most one file is open at a time."""

    def __init__(self, path: str | os.PathLike, manifest: Manifest | None = None, *, label: str = "") -> None:
        self.path = Path(path)
        self.label = label or str(self.path)
        manifest = manifest or read_manifest(self.path)
        self.files: dict[str, _SafetensorsFile] = {}
        self._where: dict[str, _SafetensorsFile] = {}
        self._current: _SafetensorsFile | None = None
        weight_map = _read_index(self.path, manifest) if manifest.sharded else None
        for name in weight_files(manifest):
            f = self.files[name] = _SafetensorsFile(self.path / name)
            if weight_map is not None:
                _check_shard(f, weight_map)
            self._where.update(dict.fromkeys(f.entries, f))

    @property
    def names(self) -> list[str]:
        return sorted(self._where)

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        """The safetensors dtype (``"F32"``...) and the shape of tensor ``name``."""
        return self._where[name].spec(name)

    def read_into(self, name: str, first: int, view: memoryview) -> None:
        """The bytes of tensor ``name`` from its element ``first`` on, into ``view``."""
        self._switch_to(self._where[name]).read_into(name, first, view, self.label)

    def in_file_order(self) -> list[str]:
        """The tensor names, file by file, in the order of their data: reading them so is
        sequential."""
        return [name for f in self.files.values() for name in f.in_file_order()]

    def locate(self, name: str, first: int = 0) -> tuple[str, int]:
        """The file holding tensor ``name`` (its name in the folder) and the byte offset of
        its element ``first`` there."""
        f = self._where[name]
        entry = f.entries[name]
        return f.file.name, f.base + entry["data_offsets"][0] + first * _ITEMSIZE[entry["dtype"]]

    def read(
        self, name: str, first: int = 0, count: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements ``first`` to ``first + count`` of the flattened tensor (all of it, in its
        shape, by default), read into ``out`` when given."""
        return self._switch_to(self._where[name]).read(name, first, count, out, self.label)

    def _switch_to(self, f: _SafetensorsFile) -> _SafetensorsFile:
        """``f``, the one file open (one at a time)."""
        if f is not self._current:
            if self._current is not None:
                self._current.close()
            self._current = f
        return f

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self._current = None

    def __enter__(self) -> WeightsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Duplicate(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _read_json(file: Path, hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """A checkpoint's JSON file, refused in one line when over MAX_JSON_BYTES (before it is
    read: a huge one would exhaust memory), unreadable, not UTF-8 or not JSON. ``hook``: the
    object_pairs_hook; its _Duplicate passes through for the caller to word."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(MAX_JSON_BYTES + 1) if size <= MAX_JSON_BYTES else b""
    except OSError as e:
        raise CheckpointError(f"{file} cannot be read ({e.strerror or e})") from None
    if size > MAX_JSON_BYTES or len(raw) > MAX_JSON_BYTES:  # the second: it grew meanwhile
        raise CheckpointError(f"{file} takes {max(size, len(raw))} bytes, over the limit of {MAX_JSON_BYTES}")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=hook)
    except _Duplicate:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{file} is not valid JSON ({str(e) or type(e).__name__})") from None


def _read_index(path: Path, manifest: Manifest) -> dict[str, str]:
    """The weight map of a sharded checkpoint's index, checked against the manifest."""
    file = path / INDEX_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        index = _read_json(file, _unique_keys)
    except _Duplicate as e:
        raise CheckpointError(f"{file} names {e.args[0]!r} twice") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{file} must be a JSON object, got {_got(index)}")
    if "metadata" in index and not isinstance(index["metadata"], dict):
        raise CheckpointError(f"{file}: metadata must be an object, got {_got(index['metadata'])}")
    weight_map = index.get("weight_map")
    if weight_map is None:
        raise CheckpointError(f"{file} has no weight_map of tensor names to files")
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{file}: weight_map must be an object of tensor name -> file, got {_got(weight_map)}"
        )
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(
                f"{file}: weight_map[{_SHORT.repr(tensor)}] must be a file name, got {_got(shard)}"
            )
    shards = weight_files(manifest)
    for tensor, shard in weight_map.items():
        if shard not in shards:
            raise CheckpointError(f"{file} maps {tensor!r} to {shard!r}, a file the manifest does not list")
    unused = sorted(set(shards) - set(weight_map.values()))
    if unused:
        raise CheckpointError(f"{file} maps no tensor to {unused[0]}, which the manifest lists")
    return weight_map


def _check_shard(f: _SafetensorsFile, weight_map: Mapping[str, str]) -> None:
    name = f.file.name
    for tensor in sorted(f.entries):
        if weight_map.get(tensor) != name:
            where = weight_map.get(tensor)
            mapped = f"maps it to {where}" if where else "does not name it"
            raise CheckpointError(f"{f.file} holds {tensor!r}, but {INDEX_FILE} {mapped}")
    for tensor, shard in sorted(weight_map.items()):
        if shard == name and tensor not in f.entries:
            raise CheckpointError(f"{f.file} lacks {tensor!r}, which {INDEX_FILE} maps to it")


def _unshare(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store (detached, on their devices) and the aliases of tied ones, which
    safetensors refuses to store twice."""
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
        tensors[name] = tensor
    return tensors, aliases


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage (safetensors refuses shared memory)."""
    tensor = tensor.cpu().contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()  # a view into a larger storage, e.g. one slice of a fused weight
    return tensor


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _natural(name: str) -> tuple[list, str]:
    """Sort key: digit runs compare as numbers (``blocks.2`` before ``blocks.10``)."""
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name))], name


def _plan_shards(tensors: Mapping[str, torch.Tensor], limit: int | None) -> list[list[str]]:
    """Tensor names per shard: in natural order, a new shard when the next tensor would take
    this one over ``limit`` bytes (so a tensor larger than the limit is alone). One shard
    (``model.safetensors``) when the tensors fit, or ``limit`` is None."""
    names = sorted(tensors, key=_natural)
    if limit is None or sum(_nbytes(tensors[n]) for n in names) <= limit:
        return [names]
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name in names:
        size = _nbytes(tensors[name])
        if current and used + size > limit:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    shards.append(current)
    return shards


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf, checked with numpy: save_checkpoint runs on the upload thread, where a
    torch op would start a second OpenMP team and slow every later training step. Checked
    4M elements at a time, so the temporary stays small whatever the tensor's size."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.numel() > _FINITE_CHUNK and tensor.is_contiguous():
        return all(_finite(chunk) for chunk in tensor.reshape(-1).split(_FINITE_CHUNK))
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
