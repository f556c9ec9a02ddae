"""The safetensors + manifest checkpoint format: round trips, integrity, and refusals."""

from __future__ import annotations

import hashlib
import json

import pytest
import safetensors.torch
import torch
from helpers import Tied, make_net, train_steps

from mlflow_ema import (
    EMA,
    CheckpointError,
    ChecksumMismatchError,
    init_fingerprint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    verify_checkpoint,
)
from mlflow_ema import checkpoint as checkpoint_module
from mlflow_ema.checkpoint import FORMAT_VERSION


@pytest.fixture
def trained(digits):
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    train_steps(model, opt, digits, 6, after_step=ema.update)
    return model, ema


def test_round_trip_is_bit_exact_and_the_manifest_describes_the_weights(trained, tmp_path):
    model, ema = trained
    path = tmp_path / "ema-step6"
    manifest = save_checkpoint(
        path,
        ema.model_state_dict(),
        kind="ema",
        step=6,
        epoch=1,
        ema_decay=ema.last_decay,
        ema_updates=ema.num_updates,
        init_fingerprint=ema.init_fingerprint,
        metadata={"note": "test"},
    )
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors"]
    on_disk = json.loads((path / "manifest.json").read_text())
    assert on_disk["format_version"] == FORMAT_VERSION == 2 and on_disk["kind"] == "ema"
    assert (on_disk["step"], on_disk["epoch"], on_disk["ema_decay"], on_disk["ema_updates"]) == (6, 1, 0.9, 6)
    assert on_disk["dtypes"] == {"float32": 8, "int64": 1}
    assert on_disk["num_parameters"] == sum(v.numel() for v in model.state_dict().values())
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert on_disk["files"]["model.safetensors"]["sha256"] == digest
    assert on_disk["init_fingerprint"] == ema.init_fingerprint and on_disk["all_finite"] is True
    assert read_manifest(path) == manifest

    state, loaded = load_checkpoint(path)
    assert loaded == manifest
    for k, v in ema.model_state_dict().items():
        assert torch.equal(state[k], v), k
    fresh = make_net(seed=5)
    fresh.load_state_dict(state)  # strict: every key present


def test_weights_are_plain_safetensors(trained, tmp_path):
    _, ema = trained
    save_checkpoint(tmp_path / "c", ema.model_state_dict(), kind="ema")
    # Readable by any safetensors reader, no pickle involved.
    raw = safetensors.torch.load_file(tmp_path / "c" / "model.safetensors")
    assert set(raw) == set(ema.model_state_dict())


def test_init_fingerprint_identifies_the_starting_weights():
    a, b, c = make_net(seed=0), make_net(seed=0), make_net(seed=1)
    assert init_fingerprint(a.state_dict()) == init_fingerprint(b.state_dict())
    assert init_fingerprint(a.state_dict()) != init_fingerprint(c.state_dict())
    reordered = dict(reversed(list(a.state_dict().items())))
    assert init_fingerprint(reordered) == init_fingerprint(a.state_dict())
    assert EMA(a).init_fingerprint == init_fingerprint(dict(a.named_parameters()))
    assert init_fingerprint(a.to(torch.bfloat16).state_dict()) != init_fingerprint(b.state_dict())


def test_tied_weights_are_stored_once_and_come_back_shared(tmp_path):
    model = Tied()
    manifest = save_checkpoint(tmp_path / "c", EMA(model).model_state_dict(), kind="ema")
    assert manifest.aliases == {"head.weight": "embed.weight"} and manifest.num_tensors == 1
    state, _ = load_checkpoint(tmp_path / "c")
    assert state["head.weight"] is state["embed.weight"]
    other = Tied()
    other.load_state_dict(state)
    assert torch.equal(other.head.weight, model.embed.weight)


def test_views_sharing_one_storage_are_stored_separately(tmp_path):
    fused = torch.arange(12.0).reshape(3, 4)
    state = {"q": fused[0], "k": fused[1], "v": fused[2]}
    save_checkpoint(tmp_path / "c", state, kind="raw")
    loaded, manifest = load_checkpoint(tmp_path / "c")
    assert manifest.aliases == {}
    for k in state:
        assert torch.equal(loaded[k], state[k])


def test_bf16_and_other_dtypes_round_trip(tmp_path):
    state = {
        "w": torch.randn(3, 3, dtype=torch.bfloat16),
        "h": torch.randn(2, dtype=torch.float16),
        "n": torch.tensor(7),
        "empty": torch.zeros(0),
    }
    manifest = save_checkpoint(tmp_path / "c", state, kind="raw")
    assert manifest.dtypes == {"bfloat16": 1, "float16": 1, "float32": 1, "int64": 1}
    loaded, _ = load_checkpoint(tmp_path / "c")
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_flagged(tmp_path, dtype, bad):
    manifest = save_checkpoint(tmp_path / "c", {"w": torch.tensor([1.0, bad], dtype=dtype)}, kind="ema")
    assert manifest.all_finite is False
    assert read_manifest(tmp_path / "c").all_finite is False
    fine = save_checkpoint(tmp_path / "d", {"w": torch.tensor([1.0, -3e4], dtype=dtype)}, kind="ema")
    assert fine.all_finite is True


# -- refusals ---------------------------------------------------------------------------


def test_sha256_mismatch_is_refused(trained, tmp_path):
    _, ema = trained
    path = tmp_path / "c"
    save_checkpoint(path, ema.model_state_dict(), kind="ema")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="does not match the manifest"):
        load_checkpoint(path)
    with pytest.raises(ChecksumMismatchError):
        verify_checkpoint(path)


def test_truncated_file_is_refused_with_or_without_verification(trained, tmp_path):
    _, ema = trained
    path = tmp_path / "c"
    save_checkpoint(path, ema.model_state_dict(), kind="ema")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path, verify=False)


def test_missing_or_foreign_folders_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        read_manifest(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_manifest(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not an mlflow-ema checkpoint manifest"):
        read_manifest(tmp_path / "empty")


def test_manifest_from_a_newer_format_or_naming_outside_files_is_refused(tmp_path):
    path = tmp_path / "c"
    save_checkpoint(path, {"w": torch.ones(2)}, kind="raw")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match="upgrade mlflow-ema"):
        read_manifest(path)
    escaped = {**manifest, "files": {"../secret": manifest["files"]["model.safetensors"]}}
    (path / "manifest.json").write_text(json.dumps(escaped))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        read_manifest(path)


def test_existing_destination_is_never_overwritten(tmp_path):
    save_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, kind="raw")
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, kind="raw")
    assert torch.equal(load_checkpoint(tmp_path / "c").state_dict["w"], torch.ones(2))


def test_a_crash_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(file, tensors, metadata=None):
        file.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, kind="raw")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        save_checkpoint(tmp_path / "c", {"w": torch.ones(1)}, kind="best")
    with pytest.raises(TypeError, match="not a tensor"):
        save_checkpoint(tmp_path / "c", {"w": [1.0]}, kind="raw")
    assert not (tmp_path / "c").exists()


def test_the_writer_writes_the_bytes_save_file_writes_and_their_sha256(tmp_path, monkeypatch):
    """Checkpoints are written and hashed in one pass; the file is the one safetensors'
    save_file writes (dtype order, names sorted, odd names, scalars, empty tensors, padding)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from mlflow_ema import safetensors_writer

    monkeypatch.setattr(safetensors_writer, "_BLOCK", 64)  # many blocks a tensor
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for i, dtype in enumerate(safetensors_writer._LAYOUT_ORDER):
        values = torch.randn(4, 33, generator=g) * 3
        tensors[f"layer.{9 - i}.w"] = (
            values.to(dtype) if dtype != torch.complex64 else torch.complex(values, values)
        )
    tensors.update({'a "quoted"\\name': torch.ones(()), "é\nü": torch.zeros(0, 5), "Z": torch.arange(7)})
    for metadata in ({"format": "pt"}, None):
        ours, theirs = tmp_path / f"ours-{metadata}", tmp_path / f"theirs-{metadata}"
        written = safetensors_writer.write_safetensors(ours, tensors, metadata=metadata)
        save_file(tensors, theirs, metadata=metadata)
        assert ours.read_bytes() == theirs.read_bytes()
        assert written == {
            "sha256": hashlib.sha256(ours.read_bytes()).hexdigest(),
            "bytes": ours.stat().st_size,
        }
    loaded = load_file(tmp_path / "ours-None")
    assert all(
        torch.equal(loaded[k].view(-1).view(torch.uint8), v.view(-1).view(torch.uint8))
        for k, v in tensors.items()
    )
    with pytest.raises(FileExistsError):  # never overwrites
        safetensors_writer.write_safetensors(tmp_path / "ours-None", tensors)
    with pytest.raises(TypeError, match="'c' is complex128, which safetensors cannot store"):
        save_checkpoint(tmp_path / "c128", {"c": torch.zeros(2, dtype=torch.complex128)}, kind="raw")
    assert not (tmp_path / "c128").exists()
