"""Sharded checkpoints (the Hugging Face layout): writing, reading, refusals, averaging, inspect.

Real tensors and real files; the layout is checked with ``json`` and ``safetensors.torch``
alone, as Hugging Face tooling reads it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from click.testing import CliRunner

from mlflow_ema import CheckpointError, ChecksumMismatchError, load_checkpoint, read_manifest, save_checkpoint
from mlflow_ema import checkpoint as checkpoint_module
from mlflow_ema import soup as soup_module
from mlflow_ema.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_FILE,
    parse_size,
    verify_checkpoint,
    weight_files,
    weights_digest,
)
from mlflow_ema.soup import AveragingError, Member, average, tensor_specs

LIMIT = 2048  # bytes per shard in these tests
SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


# every way a checkpoint folder is read: each must refuse a broken one alike
READERS = (verify_checkpoint, load_checkpoint, lambda p: load_checkpoint(p, verify=False), tensor_specs)


def model_state(seed: int = 0, *, integers: bool = False) -> dict[str, torch.Tensor]:
    """A language-model-like state dict of ~9 KB: an embedding larger than LIMIT (its own shard),
    twelve blocks (blocks.2 sorts before blocks.10), a fused qkv stored as three views of one
    storage, a BatchNorm with an int64 counter, a bf16 tensor, an empty one and a head tied
    to the embedding. ``integers``: small integer values, so means of 2 or 4 are exact."""
    g = torch.Generator().manual_seed(seed)

    def values(*shape):
        if integers:
            return torch.randint(-64, 64, shape, generator=g).float()
        return torch.randn(*shape, generator=g)

    state = {"embed.weight": values(40, 16)}  # 2560 bytes
    for i in range(12):
        state[f"blocks.{i}.fc.weight"] = values(8, 8)
        state[f"blocks.{i}.fc.bias"] = values(8)
    qkv = values(3, 8, 8)
    state.update({"attn.q": qkv[0], "attn.k": qkv[1], "attn.v": qkv[2]})
    state["bn.running_mean"] = values(8)
    state["bn.num_batches_tracked"] = torch.tensor(100 + seed)
    state["scale"] = values(4).to(torch.bfloat16)
    state["empty"] = torch.zeros(0)
    state["head.weight"] = state["embed.weight"]  # tied
    return state


def save(path: Path, state: dict, limit=LIMIT, **kwargs):
    return save_checkpoint(path, state, kind="ema", init_fingerprint="same", max_shard_size=limit, **kwargs)


def shards_of(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if SHARD.fullmatch(p.name))


def rewrite(path: Path, name: str, data: bytes) -> None:
    """Replace a file of a checkpoint and record it in the manifest, as a writer would have:
    only the structural checks can catch what is wrong."""
    (path / name).write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# -- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [(1000, 1000), ("1000", 1000), ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
     ("1.5 GB", 1_500_000_000), ("64KiB", 65536), ("10kB", 10_000), ("3B", 3), (None, None)],
)  # fmt: skip
def test_sizes_are_bytes_or_hugging_face_style_strings(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5Gb", "5 gigabytes", "GB", "-1", "0", 0, -5, True, 1.5, "1e9", ""])
def test_bad_sizes_are_refused_before_anything_is_written(tmp_path, size):
    with pytest.raises(ValueError, match="max_shard_size must be a positive number of bytes"):
        save(tmp_path / "c", {"w": torch.ones(2)}, limit=size)
    assert list(tmp_path.iterdir()) == []


def test_the_default_is_hugging_faces_5gb_everywhere():
    from mlflow_ema.cli import main

    from mlflow_ema.workflow import AverageOptions

    assert inspect.signature(save_checkpoint).parameters["max_shard_size"].default == DEFAULT_MAX_SHARD_SIZE
    assert parse_size(DEFAULT_MAX_SHARD_SIZE) == 5 * 10**9
    assert AverageOptions().max_shard_size == DEFAULT_MAX_SHARD_SIZE
    option = next(p for p in main.commands["average"].params if p.name == "max_shard_size")
    assert option.default == DEFAULT_MAX_SHARD_SIZE  # the CLI cannot import torch to read it


# -- writing ----------------------------------------------------------------------------------


def test_one_file_up_to_the_limit_shards_above_it_never_with_none(tmp_path):
    state = {"a": torch.ones(100), "b": torch.ones(150)}  # 1000 bytes
    for name, limit in [("exact", 1000), ("none", None), ("default", DEFAULT_MAX_SHARD_SIZE)]:
        manifest = save(tmp_path / name, state, limit=limit)
        assert sorted(manifest.files) == ["model.safetensors"] and not manifest.sharded
    manifest = save(tmp_path / "over", state, limit=999)
    assert sorted(manifest.files) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        INDEX_FILE,
    ]
    assert manifest.sharded and not (tmp_path / "over" / "model.safetensors").exists()
    # a single tensor larger than the limit: one shard is one file, no index
    assert sorted(save(tmp_path / "one", {"w": torch.ones(100)}, limit=10).files) == ["model.safetensors"]


def test_sharded_round_trip_is_bit_exact_and_the_manifest_records_every_file(tmp_path):
    state = model_state()
    manifest = save(tmp_path / "c", state, step=7, metadata={"note": "x"})
    on_disk = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert on_disk["format_version"] == 2 and manifest.sharded
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == sorted([*manifest.files, "manifest.json"])
    for name, entry in manifest.files.items():  # every shard and the index, with sha256 and size
        data = (tmp_path / "c" / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name
    assert manifest.aliases == {"head.weight": "embed.weight"}
    assert manifest.num_tensors == len(state) - 1
    assert manifest.num_parameters == sum(t.numel() for k, t in state.items() if k != "head.weight")
    assert manifest.dtypes == {"bfloat16": 1, "float32": 30, "int64": 1}

    loaded, again = load_checkpoint(tmp_path / "c")
    assert again == manifest == read_manifest(tmp_path / "c") == verify_checkpoint(tmp_path / "c")
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert loaded["head.weight"] is loaded["embed.weight"]  # tied weights come back shared
    unverified, _ = load_checkpoint(tmp_path / "c", verify=False)
    assert all(torch.equal(unverified[k], loaded[k]) for k in loaded)


def test_the_folder_is_a_hugging_face_sharded_checkpoint(tmp_path):
    state = model_state()
    manifest = save(tmp_path / "c", state)
    folder = tmp_path / "c"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    shards = shards_of(folder)
    n = len(shards)
    assert n >= 3 and [SHARD.fullmatch(p.name).groups() for p in shards] == [
        (f"{i:05d}", f"{n:05d}") for i in range(1, n + 1)
    ]
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards] == weight_files(manifest)

    # what HF tooling does: read the index with json, each shard with safetensors
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors = safetensors.torch.load_file(shard)
        assert {k for k, v in index["weight_map"].items() if v == shard.name} == set(tensors)
        assert not set(tensors) & set(loaded)  # a tensor lives in one shard, whole
        loaded.update(tensors)
        with safetensors.safe_open(shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
        stored = sum(t.numel() * t.element_size() for t in tensors.values())
        assert stored <= LIMIT or len(tensors) == 1, (shard.name, stored)
    stored = {k: v for k, v in state.items() if k != "head.weight"}  # the alias is in the manifest
    assert sorted(loaded) == sorted(index["weight_map"]) == sorted(stored)
    assert all(torch.equal(loaded[k], v) for k, v in stored.items())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in stored.values())
    # the embedding (2560 bytes > LIMIT) has a shard of its own; blocks.2 is not after blocks.10
    assert [k for k, v in index["weight_map"].items() if v == index["weight_map"]["embed.weight"]] == [
        "embed.weight"
    ]
    assert index["weight_map"]["blocks.2.fc.weight"] <= index["weight_map"]["blocks.10.fc.weight"]


def test_the_same_tensors_give_byte_identical_files_whatever_the_dict_order(tmp_path):
    state = model_state()
    untied = {k: v for k, v in state.items() if k != "head.weight"}  # (the first name of a tie is stored)
    for name, tensors in [
        ("a", state),
        ("b", state),
        ("c", untied),
        ("d", dict(reversed(list(untied.items())))),
    ]:
        save(tmp_path / name, tensors)
    for one, two in [("a", "b"), ("c", "d")]:
        x, y = sorted((tmp_path / one).iterdir()), sorted((tmp_path / two).iterdir())
        assert [p.name for p in x] == [p.name for p in y] and len(x) > 3
        for f, g in zip(x, y, strict=True):
            assert f.read_bytes() == g.read_bytes(), (one, two, f.name)


def test_each_write_holds_one_shard_of_cpu_tensors(tmp_path, monkeypatch):
    """Every safetensors write gets at most one shard's tensors (or one larger tensor): copies
    to the CPU and clones of views are made per shard, so writing needs about one shard of
    memory beyond the state dict. (benchmarks/average.py measures the RSS.)"""
    calls = []
    write = checkpoint_module.write_safetensors

    def recording(file, tensors, metadata):
        calls.append(
            (Path(file).name, sum(t.numel() * t.element_size() for t in tensors.values()), len(tensors))
        )
        return write(file, tensors, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "write_safetensors", recording)
    manifest = save(tmp_path / "c", model_state())
    assert [name for name, _, _ in calls] == weight_files(manifest)
    assert all(size <= LIMIT or count == 1 for _, size, count in calls), calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_nan_deep_in_a_large_tensor_is_found_in_chunks(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(checkpoint_module, "_FINITE_CHUNK", 7)  # the NaN/inf check, 7 elements at a time
    w = torch.zeros(10, 10, dtype=dtype)
    assert save(tmp_path / "fine", {"w": w}, limit=None).all_finite
    w[9, 3] = float("nan")
    assert not save(tmp_path / "nan", {"w": w, "v": torch.ones(3)}, limit=64).all_finite


def test_weights_digest_is_the_file_sha256_or_the_sha256sum_listing_of_the_shards(tmp_path):
    state = model_state()
    plain = save(tmp_path / "plain", state, limit=None)
    data = (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert weights_digest(plain) == hashlib.sha256(data).hexdigest()

    sharded = save(tmp_path / "sharded", state)
    # what `sha256sum model-*-of-*.safetensors | sha256sum` prints, from the files themselves
    listing = "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in shards_of(tmp_path / "sharded")
    )
    assert weights_digest(sharded) == hashlib.sha256(listing.encode()).hexdigest()
    other = save(tmp_path / "other", {**state, "scale": state["scale"] + 1})
    assert weights_digest(other) != weights_digest(sharded)


# -- refusals -----------------------------------------------------------------------------------


def test_a_corrupt_or_missing_shard_is_refused_in_one_line(tmp_path):
    path = tmp_path / "c"
    save(path, model_state())
    second = shards_of(path)[1]
    original = second.read_bytes()
    second.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ChecksumMismatchError) as error:
        load_checkpoint(path)
    assert f"{second} sha256" in one_line(error) and "does not match the manifest" in one_line(error)
    second.write_bytes(original[:-4])
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(path)
    second.unlink()
    for read in READERS:
        with pytest.raises(CheckpointError) as error:
            read(path)
        assert one_line(error) == f"{second} is missing"


def _index(path: Path) -> dict:
    return json.loads((path / INDEX_FILE).read_text())


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda index: {**index, "weight_map": {**index["weight_map"], "ghost": "model-00099-of-00099.safetensors"}},
         "maps 'ghost' to 'model-00099-of-00099.safetensors', a file the manifest does not list"),
        (lambda index: {**index, "weight_map": {**index["weight_map"], "ghost": index["weight_map"]["scale"]}},
         "lacks 'ghost', which model.safetensors.index.json maps to it"),
        (lambda index: {**index, "weight_map": {**index["weight_map"], "bn.running_mean": index["weight_map"]["embed.weight"]}},
         "holds 'bn.running_mean', but model.safetensors.index.json maps it to model-"),
        (lambda index: {**index, "weight_map": {k: v for k, v in index["weight_map"].items() if k != "scale"}},
         "holds 'scale', but model.safetensors.index.json does not name it"),
        (lambda index: {"metadata": index["metadata"]}, "has no weight_map of tensor names to files"),
    ],
)  # fmt: skip
def test_an_index_that_disagrees_with_the_manifest_or_the_shards_is_refused(tmp_path, break_it, message):
    path = tmp_path / "c"
    save(path, model_state())
    rewrite(path, INDEX_FILE, json.dumps(break_it(_index(path))).encode())
    for read in READERS:
        with pytest.raises(CheckpointError) as error:
            read(path)
        assert message in one_line(error)


def test_an_index_naming_a_tensor_twice_is_refused(tmp_path):
    path = tmp_path / "c"
    save(path, model_state())
    text = (path / INDEX_FILE).read_text()
    scale = _index(path)["weight_map"]["scale"]
    twice = text.replace('"weight_map": {', f'"weight_map": {{\n    "scale": "{scale}",', 1)
    assert json.loads(twice) == _index(path)  # plain json keeps the last and would not notice
    rewrite(path, INDEX_FILE, twice.encode())
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert one_line(error) == f"{path / INDEX_FILE} names 'scale' twice"


def test_a_shard_the_index_leaves_out_is_refused(tmp_path):
    path = tmp_path / "c"
    save(path, model_state())
    index = _index(path)
    last = shards_of(path)[-1].name
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != last}
    rewrite(path, INDEX_FILE, json.dumps(index).encode())
    with pytest.raises(CheckpointError, match=f"maps no tensor to {last}, which the manifest lists"):
        verify_checkpoint(path)


def test_manifests_with_an_impossible_layout_are_refused(tmp_path):
    path = tmp_path / "c"
    save(path, model_state())
    manifest = json.loads((path / "manifest.json").read_text())

    def refused(data: dict, message: str) -> None:
        (path / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(CheckpointError, match=re.escape(message)):
            read_manifest(path)

    files = manifest["files"]
    refused({**manifest, "files": {**files, "model.safetensors": files[INDEX_FILE]}}, "lists both")
    refused({**manifest, "format_version": 1}, "is checkpoint format 1, which has no sharded weights")
    refused({**manifest, "format_version": 3}, "upgrade mlflow-ema")
    refused(
        {**manifest, "files": {INDEX_FILE: files[INDEX_FILE]}},
        "lists model.safetensors.index.json but no shard",
    )
    refused({**manifest, "files": {}}, "lists no weights")


def test_a_format_1_checkpoint_still_reads(tmp_path):
    path = tmp_path / "c"
    state = model_state()
    save(path, state, limit=None)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    loaded, read = load_checkpoint(path)
    assert read.format_version == 1 and torch.equal(loaded["embed.weight"], state["embed.weight"])


# -- averaging ----------------------------------------------------------------------------------


def members_of(tmp_path: Path, limits: list, *, integers: bool = True) -> list[Member]:
    out = []
    for i, limit in enumerate(limits):
        path = tmp_path / f"m{i}-{limit}"
        save(path, model_state(seed=i, integers=integers), limit=limit)
        out.append(Member(path, label=f"member {i}"))
    return out


def test_averaging_members_of_mixed_layouts_is_the_exact_mean(tmp_path, monkeypatch):
    monkeypatch.setattr(soup_module, "_SUM_CHUNK", 16)  # many chunks per tensor
    limits = [LIMIT, None, 1000, None]  # sharded first, unsharded, sharded otherwise, unsharded
    members = members_of(tmp_path, limits)
    assert [read_manifest(m.path).sharded for m in members] == [True, False, True, False]
    soup, _ = average(members)
    states = [load_checkpoint(m.path).state_dict for m in members]
    for key, value in soup.items():
        if value.is_floating_point():  # small integers, weights 1/4: the naive mean is exact
            expected = sum(s[key].float() for s in states) / len(states)
            assert torch.equal(value, expected.to(value.dtype)), key
        else:
            assert torch.equal(value, states[0][key])  # integer buffers: the first member's
    assert soup["head.weight"] is soup["embed.weight"]
    # the layout does not change a bit of the result
    same, _ = average(members_of(tmp_path / "flat", [None] * 4))
    assert all(torch.equal(same[k], v) for k, v in soup.items())
    # and real-valued weights of any layout give the same bits as the same members unsharded
    mixed, _ = average(members_of(tmp_path / "real", limits, integers=False))
    flat, _ = average(members_of(tmp_path / "real-flat", [None] * 4, integers=False))
    assert all(torch.equal(mixed[k], flat[k]) for k in flat)


def test_averaging_keeps_at_most_one_file_open_per_member(tmp_path):
    members = members_of(tmp_path, [LIMIT, 1000, 500])
    baseline = len(os.listdir("/proc/self/fd"))
    most = 0
    read = checkpoint_module.WeightsReader.read

    def counting(self, *args, **kwargs):
        nonlocal most
        out = read(self, *args, **kwargs)
        most = max(most, len(os.listdir("/proc/self/fd")) - baseline)
        return out

    checkpoint_module.WeightsReader.read = counting
    try:
        average(members, verify=False)
    finally:
        checkpoint_module.WeightsReader.read = read
    assert 1 <= most <= len(members)
    assert len(os.listdir("/proc/self/fd")) == baseline  # all closed


def test_a_bad_shard_of_a_member_is_refused_naming_the_member_and_the_file(tmp_path):
    members = members_of(tmp_path, [None, LIMIT])
    shard = shards_of(members[1].path)[2]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ChecksumMismatchError) as error:
        average(members)
    assert one_line(error).startswith(f"member 1: {shard.name} sha256 ")
    shard.unlink()
    for verify in (True, False):
        with pytest.raises(CheckpointError) as error:
            average(members, verify=verify)
        assert one_line(error) == f"member 1: {shard.name} is missing"


def test_members_whose_tensors_differ_are_refused_whatever_their_layout(tmp_path):
    members = members_of(tmp_path, [LIMIT, None])
    other = model_state(seed=5)
    other["blocks.3.fc.weight"] = torch.ones(8, 9)
    save(tmp_path / "other", other, limit=1000)
    with pytest.raises(AveragingError) as error:
        average([members[0], Member(tmp_path / "other", label="member 2")])
    assert one_line(error) == "member 2: 'blocks.3.fc.weight' is F32 [8, 9], member 0 has F32 [8, 8]"
    del other["scale"]
    (tmp_path / "other").rename(tmp_path / "old")
    save(tmp_path / "other", other, limit=1000)
    with pytest.raises(AveragingError, match="member 2 lacks 'scale'"):
        average([members[1], Member(tmp_path / "other", label="member 2")])


# -- inspect --------------------------------------------------------------------------------------


def test_inspect_shows_a_sharded_checkpoint(tmp_path):
    from mlflow_ema.cli import main

    state = model_state()
    manifest = save(tmp_path / "c", state)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "c"), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["manifest"]["files"] == manifest.files
    stored = sorted(k for k in state if k != "head.weight")
    assert [t["name"] for t in out["tensors"]] == stored
    assert {"name": "scale", "dtype": "BF16", "shape": [4]} in out["tensors"]
    assert {"name": "embed.weight", "dtype": "F32", "shape": [40, 16]} in out["tensors"]
    text = CliRunner().invoke(main, ["inspect", str(tmp_path / "c")]).output
    for name in weight_files(manifest):
        assert f"file {name}: {manifest.files[name]['bytes']} bytes, sha256 " in text
    assert text.count("(verified)") == len(manifest.files) and "alias head.weight -> embed.weight" in text

    shards_of(tmp_path / "c")[0].write_bytes(b"\0" * manifest.files[weight_files(manifest)[0]]["bytes"])
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "c")])
    assert result.exit_code == 1
    assert "model-00001-of-" in result.output and "does not match the manifest" in result.output
