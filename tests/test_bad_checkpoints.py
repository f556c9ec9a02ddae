"""Broken checkpoints: forged safetensors headers, malformed manifests and indexes.

Each case saves a real checkpoint, corrupts it as an attacker or a broken disk would and,
where the corrupted file is listed in the manifest, records its new sha256 and size there
(as a consistent attacker would), so the structural checks, not the checksums, must catch
it. Every way a checkpoint is read must refuse it with one CheckpointError line naming the
file (and, for the manifest and the index, the field), never a traceback or a MemoryError.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch

from mlflow_ema import CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from mlflow_ema.checkpoint import INDEX_FILE, MAX_HEADER_BYTES, MAX_JSON_BYTES, WeightsReader
from mlflow_ema.soup import Member, average, tensor_specs

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"

# every way a checkpoint folder is read; average() gets a sound first member and the broken one
READERS = {
    "verify_checkpoint": lambda path, good: verify_checkpoint(path),
    "load_checkpoint": lambda path, good: load_checkpoint(path),
    "load_checkpoint(verify=False)": lambda path, good: load_checkpoint(path, verify=False),
    "WeightsReader": lambda path, good: WeightsReader(path).close(),
    "tensor_specs": lambda path, good: tensor_specs(path),
    "average": lambda path, good: average([Member(good), Member(path)]),
}


def state() -> dict[str, torch.Tensor]:
    return {
        "w": torch.arange(6.0).reshape(2, 3),  # F32, 24 bytes
        "b": torch.ones(3, dtype=torch.bfloat16),  # 6 bytes
        "n": torch.tensor(7),  # I64 scalar, 8 bytes
    }


def save(path: Path, max_shard_size: int | None = None) -> Path:
    save_checkpoint(path, state(), kind="ema", init_fingerprint="same", max_shard_size=max_shard_size)
    return path


@pytest.fixture
def good(tmp_path) -> Path:
    return save(tmp_path / "good")


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return save(tmp_path / "c")


def record(path: Path, name: str) -> None:
    """Record file ``name``'s current sha256 and size in the manifest, as an attacker who
    also rewrites the manifest would: the checksums then pass and the parse is reached."""
    data = (path / name).read_bytes()
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / MANIFEST).write_text(json.dumps(manifest))


def split(file: Path) -> tuple[dict, bytes]:
    """A safetensors file's parsed header and its data."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def forge(path: Path, name: str, header: dict | bytes, data: bytes, length: int | None = None) -> None:
    """Rewrite a weights file with ``header`` (JSON-encoded unless bytes) and ``data``; the
    length prefix is the header's unless ``length`` forges it. Recorded in the manifest."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = struct.pack("<Q", len(body) if length is None else length)
    (path / name).write_bytes(prefix + body + data)
    record(path, name)


def refused(path: Path, good: Path, *needles: str) -> None:
    """Every reader raises CheckpointError, in one short line holding every needle."""
    for label, read in READERS.items():
        try:
            read(path, good)
        except CheckpointError as e:
            message = str(e)
        except MemoryError:  # the check must come before the allocation, not after
            pytest.fail(f"{label} ran out of memory instead of refusing the header length")
        else:
            pytest.fail(f"{label} accepted the broken checkpoint")
        assert "\n" not in message, (label, message)
        assert len(message) < 600, (label, message)
        for needle in needles:
            assert needle in message, (label, message)


def with_w(header: dict, **changes) -> dict:
    """The header with tensor ``w``'s entry changed."""
    return {**header, "w": {**header["w"], **changes}}


# -- safetensors headers ----------------------------------------------------------------------


@pytest.mark.parametrize("length", [2**64 - 1, 2**40, MAX_HEADER_BYTES + 1])
def test_a_huge_header_length_is_refused_before_anything_is_allocated(ckpt, good, length):
    header, data = split(ckpt / WEIGHTS)
    forge(ckpt, WEIGHTS, header, data, length=length)
    refused(ckpt, good, str(ckpt / WEIGHTS), f"header length {length} bytes is over the limit")


def test_a_header_length_beyond_the_file_is_refused(ckpt, good):
    header, data = split(ckpt / WEIGHTS)
    body = json.dumps(header).encode()
    size = 8 + len(body) + len(data)
    forge(ckpt, WEIGHTS, body, data, length=size)  # within the limit, past the end
    refused(ckpt, good, str(ckpt / WEIGHTS), f"header length {size} bytes runs past the end")


def test_a_file_shorter_than_its_length_prefix_is_refused(ckpt, good):
    (ckpt / WEIGHTS).write_bytes(b"\x01\x02\x03")
    record(ckpt, WEIGHTS)
    refused(ckpt, good, str(ckpt / WEIGHTS), "shorter than the 8-byte header length")


def _offsets(header: dict) -> tuple[int, int]:
    return tuple(header["w"]["data_offsets"])


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda h, d: b"{not json", "the header is not valid JSON"),
        (lambda h, d: b'{"w": "\xff\xfe"}', "the header is not UTF-8"),
        (lambda h, d: b"[" * 100_000, "the header is not valid JSON"),  # nested past the recursion limit
        (lambda h, d: b"[1, 2]", "the header must be a JSON object, got a list [1, 2]"),
        (lambda h, d: b'"w"', "the header must be a JSON object, got 'w'"),
        (lambda h, d: {**h, "w": 3}, "'w' must be an object with dtype, shape and data_offsets, got 3"),
        (lambda h, d: {**h, "__metadata__": {"format": 1}}, "__metadata__ must be an object of strings"),
        (lambda h, d: with_w(h, dtype=5), "'w' has dtype 5, not a string"),
        (lambda h, d: {**h, "w": {"shape": [2, 3], "data_offsets": _offsets(h)}}, "'w' has dtype null"),
        (lambda h, d: with_w(h, shape=[-2, -3]), "'w' has shape a list [-2, -3], not a list of non-negative"),
        (lambda h, d: with_w(h, shape=["2", "3"]), "'w' has shape a list ['2', '3']"),
        (lambda h, d: with_w(h, shape=[True, 6]), "'w' has shape a list [True, 6]"),
        (lambda h, d: with_w(h, shape="2x3"), "'w' has shape '2x3'"),
        (lambda h, d: with_w(h, data_offsets=[0]), "'w' has data_offsets a list [0], not two integers"),
        (lambda h, d: with_w(h, data_offsets=[0.0, 24.0]), "'w' has data_offsets a list [0.0, 24.0]"),
        (lambda h, d: with_w(h, data_offsets=None), "'w' has data_offsets null"),
        (lambda h, d: with_w(h, data_offsets=[24, 0]), "'w' has data_offsets [24, 0], outside the 38 bytes"),
        (lambda h, d: with_w(h, data_offsets=[-8, 16]), "'w' has data_offsets [-8, 16], outside the 38 bytes"),
        (lambda h, d: with_w(h, data_offsets=[38, 62]), "'w' has data_offsets [38, 62], outside the 38 bytes"),
        (lambda h, d: with_w(h, data_offsets=[0, 2**63]), "outside the 38 bytes of data"),
        (lambda h, d: with_w(h, shape=[2, 4]), "'w' is F32 [2, 4], 32 bytes, but its data_offsets span 24"),
        (lambda h, d: with_w(h, shape=[2**62, 2**62]), "'w' is F32 [4611686018427387904, 4611686018427387904], over the 38 bytes"),
        (lambda h, d: with_w(h, shape=[0]), "'w' is F32 [0], 0 bytes, but its data_offsets span 24"),
        (lambda h, d: with_w(h, dtype="F64"), "'w' is F64 [2, 3], 48 bytes, but its data_offsets span 24"),
    ],
)  # fmt: skip
def test_a_malformed_header_is_refused_in_one_line(ckpt, good, corrupt, message):
    header, data = split(ckpt / WEIGHTS)
    forge(ckpt, WEIGHTS, corrupt(header, data), data)
    refused(ckpt, good, f"{ckpt / WEIGHTS} is not a readable safetensors file (", message)


def test_offsets_past_the_end_of_a_truncated_file_are_refused(ckpt, good):
    header, data = split(ckpt / WEIGHTS)
    forge(ckpt, WEIGHTS, header, data[:-8])  # the last tensor's bytes are gone
    refused(ckpt, good, str(ckpt / WEIGHTS), "outside the 30 bytes of data")


def test_a_header_naming_a_tensor_twice_is_refused(ckpt, good):
    header, data = split(ckpt / WEIGHTS)
    text = json.dumps(header)
    twice = text.replace("{", '{"w": ' + json.dumps(header["w"]) + ", ", 1)
    assert json.loads(twice) == header  # plain json keeps the last and would not notice
    forge(ckpt, WEIGHTS, twice.encode(), data)
    refused(ckpt, good, str(ckpt / WEIGHTS), "the header names 'w' twice")


def test_an_unknown_dtype_is_listed_and_refused_on_read_naming_it(ckpt):
    header, data = split(ckpt / WEIGHTS)
    forge(ckpt, WEIGHTS, with_w(header, dtype="F4_E2M1"), data)
    assert {"name": "w", "dtype": "F4_E2M1", "shape": [2, 3]} in tensor_specs(ckpt)
    verify_checkpoint(ckpt)  # the header itself is well-formed
    with WeightsReader(ckpt) as reader:
        assert torch.equal(reader.read("n"), torch.tensor(7))
        with pytest.raises(CheckpointError, match="'w' has dtype F4_E2M1, which mlflow-ema cannot read"):
            reader.read("w")
    for verify in (True, False):
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(ckpt, verify=verify)
        assert "\n" not in str(error.value) and str(ckpt / WEIGHTS) in str(error.value)


def test_a_huge_header_length_in_a_shard_is_refused(tmp_path, good):
    path = save(tmp_path / "sharded", max_shard_size=16)  # [b, n] and [w]
    shard = sorted(path.glob("model-*-of-*.safetensors"))[-1]
    header, data = split(shard)
    forge(path, shard.name, header, data, length=2**64 - 1)
    refused(path, good, str(shard), "is over the limit")


def test_a_malformed_shard_header_is_refused(tmp_path, good):
    path = save(tmp_path / "sharded", max_shard_size=16)
    shard = sorted(path.glob("model-*-of-*.safetensors"))[-1]
    header, data = split(shard)
    forge(path, shard.name, with_w(header, data_offsets=[0, 10**6]), data)
    refused(path, good, str(shard), "'w' has data_offsets [0, 1000000], outside the 24 bytes of data")


# -- the index of a sharded checkpoint ----------------------------------------------------------


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda index: b"\xff\xfe", "is not valid JSON ("),
        (lambda index: b"[" * 100_000, "is not valid JSON (maximum recursion depth"),
        (lambda index: b"[]", "must be a JSON object, got a list []"),
        (lambda index: {**index, "metadata": "big"}, ": metadata must be an object, got 'big'"),
        (lambda index: {**index, "weight_map": list(index["weight_map"])}, ": weight_map must be an object of tensor name -> file, got a list"),
        (lambda index: {**index, "weight_map": {**index["weight_map"], "w": 3}}, ": weight_map['w'] must be a file name, got 3"),
        (lambda index: {**index, "weight_map": {**index["weight_map"], "w": None}}, ": weight_map['w'] must be a file name, got null"),
    ],
)  # fmt: skip
def test_a_malformed_index_is_refused_naming_the_field(tmp_path, good, corrupt, message):
    path = save(tmp_path / "sharded", max_shard_size=16)
    broken = corrupt(json.loads((path / INDEX_FILE).read_text()))
    (path / INDEX_FILE).write_bytes(broken if isinstance(broken, bytes) else json.dumps(broken).encode())
    record(path, INDEX_FILE)
    refused(path, good, str(path / INDEX_FILE), message)


def test_an_oversized_index_is_refused_unread(tmp_path, good):
    path = save(tmp_path / "sharded", max_shard_size=16)
    padded = (path / INDEX_FILE).read_text() + " " * MAX_JSON_BYTES  # valid JSON, too large
    (path / INDEX_FILE).write_text(padded)
    record(path, INDEX_FILE)
    refused(
        path, good, str(path / INDEX_FILE), f"takes {len(padded)} bytes, over the limit of {MAX_JSON_BYTES}"
    )


# -- manifest.json -------------------------------------------------------------------------------


def _files(manifest: dict, **entry) -> dict:
    """The manifest with model.safetensors' entry in ``files`` changed."""
    return {**manifest, "files": {WEIGHTS: {**manifest["files"][WEIGHTS], **entry}}}


def _without(manifest: dict, field: str) -> dict:
    return {k: v for k, v in manifest.items() if k != field}


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda m: {**m, "files": list(m["files"].values())}, "files must be an object of file name -> {sha256, bytes}, got a list"),
        (lambda m: {**m, "files": "model.safetensors"}, "files must be an object of file name -> {sha256, bytes}, got 'model"),
        (lambda m: {**m, "files": {WEIGHTS: "abc"}}, "files['model.safetensors'] must be an object with sha256 and bytes, got 'abc'"),
        (lambda m: _files(m, sha256="abc123"), "files['model.safetensors'].sha256 must be 64 lowercase hex digits, got 'abc123'"),
        (lambda m: _files(m, sha256=m["files"][WEIGHTS]["sha256"].upper()), "files['model.safetensors'].sha256 must be 64 lowercase hex digits"),
        (lambda m: _files(m, sha256=None), "files['model.safetensors'].sha256 must be 64 lowercase hex digits, got null"),
        (lambda m: _files(m, bytes="120"), "files['model.safetensors'].bytes must be a non-negative integer, got '120'"),
        (lambda m: _files(m, bytes=-1), "files['model.safetensors'].bytes must be a non-negative integer, got -1"),
        (lambda m: _files(m, bytes=True), "files['model.safetensors'].bytes must be a non-negative integer, got true"),
        (lambda m: _files(m, bytes=120.5), "files['model.safetensors'].bytes must be a non-negative integer, got 120.5"),
        (lambda m: {**m, "num_tensors": "3"}, "num_tensors must be a non-negative integer, got '3'"),
        (lambda m: {**m, "num_tensors": True}, "num_tensors must be a non-negative integer, got true"),
        (lambda m: {**m, "num_parameters": -1}, "num_parameters must be a non-negative integer, got -1"),
        (lambda m: {**m, "dtypes": ["float32"]}, "dtypes must be an object of dtype name -> number of tensors, got a list ['float32']"),
        (lambda m: {**m, "dtypes": {"float32": "1"}}, "dtypes must be an object of dtype name -> number of tensors, got an object {'float32': '1'}"),
        (lambda m: {**m, "all_finite": "yes"}, "all_finite must be true or false, got 'yes'"),
        (lambda m: {**m, "all_finite": 1}, "all_finite must be true or false, got 1"),
        (lambda m: {**m, "step": "6"}, "step must be an integer or null, got '6'"),
        (lambda m: {**m, "step": 6.5}, "step must be an integer or null, got 6.5"),
        (lambda m: {**m, "epoch": True}, "epoch must be an integer or null, got true"),
        (lambda m: {**m, "ema_updates": []}, "ema_updates must be an integer or null, got a list []"),
        (lambda m: {**m, "ema_decay": "0.9"}, "ema_decay must be a number or null, got '0.9'"),
        (lambda m: {**m, "ema_decay": False}, "ema_decay must be a number or null, got false"),
        (lambda m: {**m, "init_fingerprint": 5}, "init_fingerprint must be a string or null, got 5"),
        (lambda m: {**m, "aliases": ["w"]}, "aliases must be an object of tensor name -> tensor name, got a list ['w']"),
        (lambda m: {**m, "aliases": {"v": 1}}, "aliases must be an object of tensor name -> tensor name, got an object {'v': 1}"),
        (lambda m: {**m, "metadata": "a\nb"}, "metadata must be an object, got 'a\\nb'"),
        (lambda m: {**m, "metadata": "x" * 10**6}, "metadata must be an object, got 'xxxxxxxxxxxx"),
        (lambda m: {**m, "kind": "best"}, "kind must be one of 'raw', 'ema', 'soup', 'posthoc', got 'best'"),
        (lambda m: {**m, "kind": ["ema"]}, "kind must be one of 'raw', 'ema', 'soup', 'posthoc', got a list ['ema']"),
        (lambda m: {**m, "created_by": 5}, "created_by must be a string, got 5"),
        (lambda m: {**m, "format_version": "2"}, "format_version must be a positive integer, got '2'"),
        (lambda m: {**m, "format_version": True}, "format_version must be a positive integer, got true"),
        (lambda m: {**m, "format_version": 0}, "format_version must be a positive integer, got 0"),
        (lambda m: _without(m, "files"), "is incomplete: files is missing"),
        (lambda m: _without(m, "all_finite"), "is incomplete: all_finite is missing"),
    ],
)  # fmt: skip
def test_a_malformed_manifest_is_refused_naming_the_file_and_the_field(ckpt, good, corrupt, message):
    manifest = json.loads((ckpt / MANIFEST).read_text())
    (ckpt / MANIFEST).write_text(json.dumps(corrupt(manifest)))
    refused(ckpt, good, str(ckpt / MANIFEST), message)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe{}", "is not valid JSON ("),
        (b"[" * 100_000, "is not valid JSON (maximum recursion depth"),
        (b"[]", "is not an mlflow-ema checkpoint manifest"),
    ],
)
def test_a_manifest_that_is_not_a_json_object_is_refused(ckpt, good, content, message):
    (ckpt / MANIFEST).write_bytes(content)
    refused(ckpt, good, str(ckpt / MANIFEST), message)


def test_an_oversized_manifest_is_refused_unread(ckpt, good):
    padded = (ckpt / MANIFEST).read_text() + " " * MAX_JSON_BYTES  # valid JSON, too large
    (ckpt / MANIFEST).write_text(padded)
    refused(
        ckpt, good, str(ckpt / MANIFEST), f"takes {len(padded)} bytes, over the limit of {MAX_JSON_BYTES}"
    )


def test_the_sound_checkpoints_of_these_tests_read(ckpt, tmp_path):
    """The checks refuse only what is broken: both layouts read and round-trip."""
    sharded = save(tmp_path / "sharded", max_shard_size=16)
    for path in (ckpt, sharded):
        verify_checkpoint(path)
        for verify in (True, False):
            loaded = load_checkpoint(path, verify=verify).state_dict
            assert all(torch.equal(loaded[k], v) for k, v in state().items())
        assert [s["name"] for s in tensor_specs(path)] == ["b", "n", "w"]
