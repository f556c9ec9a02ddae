"""The averaging arithmetic: weights, dtypes, chunked reads, tied weights, refusals."""

from __future__ import annotations

import pytest
import torch

import mlflow_ema
from mlflow_ema import save_checkpoint
from mlflow_ema import soup as soup_module
from mlflow_ema.soup import AveragingError, Member, average


def members(tmp_path, states, fingerprints=None):
    out = []
    for i, state in enumerate(states):
        fingerprint = fingerprints[i] if fingerprints else "same"
        save_checkpoint(tmp_path / f"m{i}", state, kind="ema", init_fingerprint=fingerprint)
        out.append(Member(tmp_path / f"m{i}", weight=1.0, label=f"member {i}"))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weighted_average_in_chunks_matches_the_direct_computation(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(soup_module, "_SUM_CHUNK", 16)  # 16 elements: many chunks per tensor
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(7, 13, generator=g).to(dtype), "n": torch.tensor(i + 5)} for i in range(3)]
    weights = [0.5, 0.3, 0.2]
    ms = [
        Member(m.path, weight=w, label=m.label)
        for m, w in zip(members(tmp_path, states), weights, strict=True)
    ]
    out, _ = average(ms)
    expected = sum(w * s["w"].float() for s, w in zip(states, weights, strict=True))
    assert out["w"].dtype == dtype
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(out["w"], expected.to(dtype), **tolerance)
    again, _ = average(ms)
    assert torch.equal(again["w"], out["w"])  # deterministic
    assert torch.equal(out["n"], states[0]["n"])  # integer buffers: the first member's, never divided
    out64, _ = average(ms, accumulate=torch.float64, dtype=torch.float32)
    assert out64["w"].dtype == torch.float32


def test_tied_weights_stay_tied(tmp_path):
    tied = torch.full((3, 4), 2.0)
    ms = members(tmp_path / "tied", [{"a": t, "b": t} for t in (tied, tied * 2)])
    out, manifests = average(ms)
    assert manifests[0].aliases == {"b": "a"} and out["b"] is out["a"]
    assert torch.equal(out["a"], torch.full((3, 4), 3.0))


def test_refusals_name_the_member(tmp_path):
    ok = {"w": torch.ones(2, 2)}
    with pytest.raises(AveragingError, match=r"member 1: 'w' is F32 \[2, 3\], member 0 has F32 \[2, 2\]"):
        average(members(tmp_path / "shape", [ok, {"w": torch.ones(2, 3)}]))
    with pytest.raises(AveragingError, match="member 1 lacks 'w'"):
        average(members(tmp_path / "keys", [ok, {"v": torch.ones(2, 2)}]))
    with pytest.raises(AveragingError, match="did not start from the same weights"):
        average(members(tmp_path / "init", [ok, ok], fingerprints=["a", "b"]))
    with pytest.raises(AveragingError, match="NaN or infinite"):
        average(members(tmp_path / "nan", [ok, {"w": torch.full((2, 2), float("nan"))}]))
    with pytest.raises(AveragingError, match="weights must be finite"):
        average([Member(m.path, weight=-1.0) for m in members(tmp_path / "neg", [ok, ok])])
    with pytest.raises(AveragingError, match="nothing to average"):
        average([])


def test_greedy_soup_keeps_a_member_only_when_the_score_does_not_drop(tmp_path):
    from mlflow_ema.soup import greedy_soup

    # the score prefers an average close to 1.0: with 1.2 the soup drifts to 1.1 (rejected);
    # another 1.0 keeps the score as it is (kept: ties count as no worse)
    ms = members(tmp_path, [{"w": torch.full((2,), v)} for v in (1.0, 1.2, 1.0)])
    tried = []
    kept, soup, best = greedy_soup(
        ms,
        lambda state: -abs(float(state["w"][0]) - 1.0),
        on_trial=lambda m, value, keep: tried.append((m.label, keep)),
    )
    assert tried == [("member 0", True), ("member 1", False), ("member 2", True)]
    assert [m.label for m in kept] == ["member 0", "member 2"]
    assert torch.equal(soup["w"], torch.full((2,), 1.0)) and best == 0.0


# -- mlflow_ema.average_checkpoints: local folders, no MLflow ---------------------------------------


def test_average_checkpoints_of_local_folders_returns_or_writes_the_weighted_mean(tmp_path):
    g = torch.Generator().manual_seed(1)
    states = [{"w": torch.randn(5, 3, generator=g), "n": torch.tensor(i)} for i in range(3)]
    paths = [m.path for m in members(tmp_path, states)]
    mean = mlflow_ema.average_checkpoints(paths)  # in memory, uniform
    torch.testing.assert_close(mean["w"], sum(s["w"] for s in states) / 3)
    signed = mlflow_ema.average_checkpoints(
        paths, tmp_path / "out", [1.5, -0.25, -0.25], accumulate="float64"
    )
    torch.testing.assert_close(signed["w"], 1.5 * states[0]["w"] - 0.25 * (states[1]["w"] + states[2]["w"]))
    written, manifest = mlflow_ema.load_checkpoint(tmp_path / "out")
    assert torch.equal(written["w"], signed["w"]) and torch.equal(written["n"], states[0]["n"])
    assert manifest.kind == "soup" and manifest.metadata["weights"] == [1.5, -0.25, -0.25]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p, out: mlflow_ema.average_checkpoints(p, out, [1.0]), "1 weights for 2 checkpoints"),
        (lambda p, out: mlflow_ema.average_checkpoints(p, out, [1.0, -1.0]), "with a positive sum"),
        (lambda p, out: mlflow_ema.average_checkpoints(p, p[0]), "already exists"),
        (
            lambda p, out: mlflow_ema.average_checkpoints(p, out, accumulate="int8"),
            "accumulate must be one of",
        ),
    ],
)
def test_average_checkpoints_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, call, message):
    paths = [m.path for m in members(tmp_path, [{"w": torch.ones(2)}, {"w": torch.zeros(2)}])]
    with pytest.raises(mlflow_ema.AveragingError, match=None) as error:
        call(paths, tmp_path / "out")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


# -- verification while averaging: every byte of every member is hashed once -----------------------


def _flip_byte(file, offset):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01  # a float stays a finite float: only the checksum can tell
    file.write_bytes(bytes(data))


def _offset_of(checkpoint, name, element=0):
    from mlflow_ema.checkpoint import WeightsReader

    with WeightsReader(checkpoint) as reader:
        file, offset = reader.locate(name, element)
    return checkpoint / file, offset


@pytest.mark.parametrize(
    ("member", "where"),
    [
        (2, lambda path: _offset_of(path, "w", 1000)),  # summed data, past several buffers
        (1, lambda path: _offset_of(path, "n")),  # an integer buffer: taken from member 0, never read here
        (1, lambda path: (path / "model.safetensors", 20)),  # the header
        (0, lambda path: _offset_of(path, "v", 3)),  # a member read in another layout (sharded)
    ],
    ids=["summed-data", "unread-buffer", "header", "other-layout"],
)
def test_a_corrupt_byte_anywhere_in_a_member_is_refused_and_nothing_is_written(
    tmp_path, monkeypatch, member, where
):
    monkeypatch.setattr(soup_module, "_SUM_CHUNK", 16)  # 1 KiB buffers: filled and hashed in turn
    g = torch.Generator().manual_seed(2)
    states = [{"w": torch.randn(40, 33, generator=g), "v": torch.randn(50, generator=g), "n": torch.tensor(i)}
              for i in range(3)]  # fmt: skip
    for i, state in enumerate(states):  # member 0 sharded, one tensor a file: read out of its file order
        save_checkpoint(tmp_path / f"m{i}", state, kind="ema", init_fingerprint="same",
                        max_shard_size=100 if i == 0 else None)  # fmt: skip
    paths = [tmp_path / f"m{i}" for i in range(3)]
    assert mlflow_ema.average_checkpoints(paths)["w"].shape == (40, 33)  # intact: accepted
    _flip_byte(*where(paths[member]))
    with pytest.raises(mlflow_ema.ChecksumMismatchError, match="does not match the manifest") as error:
        mlflow_ema.average_checkpoints(paths, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "m0",
        "m1",
        "m2",
    ]


def test_average_checkpoints_names_members_by_label_and_reports_progress(tmp_path):
    paths = [m.path for m in members(tmp_path, [{"w": torch.ones(2), "v": torch.ones(3)}] * 2)]
    seen = []
    mlflow_ema.average_checkpoints(paths, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]
    (paths[1] / "model.safetensors").write_bytes((paths[1] / "model.safetensors").read_bytes()[:-1] + b"\0")
    with pytest.raises(mlflow_ema.ChecksumMismatchError, match=r"^second: model.safetensors sha256"):
        mlflow_ema.average_checkpoints(paths, labels=["first", "second"])
    with pytest.raises(mlflow_ema.AveragingError, match="1 labels for 2 checkpoints"):
        mlflow_ema.average_checkpoints(paths, labels=["first"])


def test_a_training_state_is_not_read_so_not_hashed_but_an_index_is(tmp_path):
    """Averaging reads the weights and a sharded member's index; a member's training state
    (optimizer moments: often twice the weights) is only size-checked."""
    state = {"w": torch.ones(40), "v": torch.zeros(40)}
    for i in range(2):
        save_checkpoint(tmp_path / f"m{i}", state, kind="raw", init_fingerprint="same",
                        training_state={"step": i, "m": torch.ones(40)}, max_shard_size=200)  # fmt: skip
    paths = [tmp_path / "m0", tmp_path / "m1"]
    _flip_byte(paths[1] / "training_state.pt", 100)
    assert torch.equal(mlflow_ema.average_checkpoints(paths)["w"], torch.ones(40))
    index = paths[1] / "model.safetensors.index.json"
    index.write_text(index.read_text().replace('"total_size"', '"total_sizE"'))
    with pytest.raises(mlflow_ema.ChecksumMismatchError, match="model.safetensors.index.json sha256"):
        mlflow_ema.average_checkpoints(paths)
