"""autolog / watch / log_checkpoint / swap on a plain training loop, against a real sqlite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import Tied, logged_models, make_net, train_steps
from mlflow import MlflowClient
from torch import nn

import mlflow_ema
from mlflow_ema import EMA, init_fingerprint, load_checkpoint, read_manifest
from mlflow_ema.tracking import AutologConfig
from mlflow_ema.uploader import RetryPolicy


def download(model, tmp_path: Path) -> Path:
    dst = tmp_path / "dl" / model.model_id
    dst.mkdir(parents=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(dst)))


def linked(model) -> dict[str, float]:
    return {m.key: m.value for m in model.metrics or []}


def test_one_line_autolog_logs_raw_and_ema_checkpoints_when_the_run_ends(tracking, digits, tmp_path):
    mlflow_ema.autolog()
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with mlflow.start_run() as run:
        train_steps(model, opt, digits, 20)
        mlflow.log_metric("val_acc", 0.75, step=20)
    # Once the with-block has exited, the run's checkpoints are complete.
    models = logged_models(run.info.run_id)
    assert [(m.tags["mlflow_ema.kind"], m.tags["mlflow_ema.step"]) for m in models] == [
        ("ema", "20"),
        ("raw", "20"),
    ]
    assert all(str(m.status) == "READY" and m.source_run_id == run.info.run_id for m in models)
    ema_model, raw_model = models
    assert linked(raw_model) == {"val_acc": 0.75} and linked(ema_model) == {}

    # The EMA checkpoint is what an EMA built by hand just before the first step computes.
    mlflow_ema.autolog(disable=True)
    reference = make_net()
    start = init_fingerprint(dict(reference.named_parameters()))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    built = []

    def build_once(*_):
        if not built:
            built.append(EMA(reference, decay=AutologConfig().decay))

    ref_opt.register_step_pre_hook(build_once)
    train_steps(reference, ref_opt, digits, 20, after_step=lambda: built[0].update())
    ref_ema = built[0]
    ema_state, ema_manifest = load_checkpoint(download(ema_model, tmp_path))
    raw_state, raw_manifest = load_checkpoint(download(raw_model, tmp_path))
    for key, value in ref_ema.model_state_dict().items():
        assert torch.equal(ema_state[key], value), key
    for key, value in model.state_dict().items():
        assert torch.equal(raw_state[key], value), key
    assert ema_manifest.init_fingerprint == raw_manifest.init_fingerprint == start
    assert ema_model.tags["mlflow_ema.init_fingerprint"] == start
    assert ema_manifest.ema_updates == 20 and ema_manifest.step == 20
    assert (
        mlflow.get_run(run.info.run_id).data.tags["mlflow_ema.model_class"]
        == "torch.nn.modules.container:Sequential"
    )


def test_checkpoints_every_n_epochs_follow_the_training_dataloader(tracking, digits):
    mlflow_ema.autolog(checkpoint_every_n_epochs=1)
    x, y = digits
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=300)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=600)
    model = make_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with mlflow.start_run() as run:
        for _ in range(3):
            for xb, yb in train:  # 6 batches
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():  # exhausting a loader without optimizer steps is no epoch
                correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in val)
            mlflow.log_metric("val_acc", correct / len(x))
    models = logged_models(run.info.run_id)
    steps = [
        (m.tags["mlflow_ema.step"], m.tags["mlflow_ema.epoch"])
        for m in models
        if m.tags["mlflow_ema.kind"] == "raw"
    ]
    assert steps == [("6", "1"), ("12", "2"), ("18", "3")]  # the end-of-run one is the epoch-3 one
    # Each evaluation, logged without a step, links to the checkpoint of the weights it measured.
    raw = [m for m in models if m.tags["mlflow_ema.kind"] == "raw"]
    history = MlflowClient().get_metric_history(run.info.run_id, "val_acc")
    assert [linked(m)["val_acc"] for m in raw] == [h.value for h in history]


def test_checkpoint_every_n_steps(tracking, digits):
    mlflow_ema.autolog(checkpoint_every_n_steps=4, checkpoint_at_end=False)
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow.start_run() as run:
        train_steps(model, opt, digits, 10)
    raw_steps = [
        m.tags["mlflow_ema.step"]
        for m in logged_models(run.info.run_id)
        if m.tags["mlflow_ema.kind"] == "raw"
    ]
    assert raw_steps == ["4", "8"]


def test_log_checkpoint_on_demand_links_raw_and_ema_metrics(tracking, digits):
    mlflow_ema.autolog(checkpoint_at_end=False)
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow.start_run() as run:
        train_steps(model, opt, digits, 5)
        mlflow_ema.log_checkpoint(epoch=1, metrics={"val_acc": 0.5, "ema/val_acc": 0.6})
        train_steps(model, opt, digits, 5, start=5)
        mlflow_ema.log_checkpoint(step=100, metrics={"val_acc": 0.7, "ema/val_acc": 0.8})
    models = logged_models(run.info.run_id)
    got = [
        (m.tags["mlflow_ema.kind"], m.tags["mlflow_ema.step"], m.tags.get("mlflow_ema.epoch"), linked(m))
        for m in models
    ]
    assert got == [
        ("ema", "5", "1", {"ema/val_acc": 0.6}),
        ("raw", "5", "1", {"val_acc": 0.5}),
        ("ema", "100", None, {"ema/val_acc": 0.8}),
        ("raw", "100", None, {"val_acc": 0.7}),
    ]
    history = MlflowClient().get_metric_history(run.info.run_id, "ema/val_acc")
    assert [(h.step, h.value) for h in history] == [(5, 0.6), (100, 0.8)]


def test_swap_evaluates_with_ema_weights_and_prefixes_metrics(tracking, digits):
    mlflow_ema.autolog(checkpoint_at_end=False)
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with mlflow.start_run() as run:
        train_steps(model, opt, digits, 10)
        raw = {k: v.clone() for k, v in model.state_dict().items()}
        averaged = {k: v.clone() for k, v in mlflow_ema.get_ema().model_state_dict().items()}
        with mlflow_ema.swap():
            assert torch.equal(model[0].weight, averaged["0.weight"])
            mlflow.log_metric("val_acc", 0.9, step=10)
            mlflow.log_metrics({"val_loss": 0.1}, step=10)
        mlflow.log_metric("val_acc", 0.8, step=10)
        for k, v in model.state_dict().items():
            assert torch.equal(v, raw[k]), k
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    assert metrics == {"ema/val_acc": 0.9, "ema/val_loss": 0.1, "val_acc": 0.8}


def test_keep_top_k_keeps_the_best_and_the_last(tracking, digits):
    mlflow_ema.autolog(keep_top_k=2, monitor="ema/val_acc", mode="max")
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scores = [0.5, 0.9, 0.7, 0.8, 0.6]
    with mlflow.start_run() as run:
        for i, score in enumerate(scores):
            train_steps(model, opt, digits, 2, start=2 * i)
            mlflow_ema.log_checkpoint(metrics={"ema/val_acc": score})
    kept = logged_models(run.info.run_id)  # search does not return deleted models
    assert sorted({int(m.tags["mlflow_ema.step"]) for m in kept}) == [4, 8, 10]  # 0.9, 0.8 and the last
    assert len(kept) == 6


def test_no_active_run_warns_once_and_training_goes_on(tracking, digits):
    mlflow_ema.autolog(checkpoint_every_n_steps=2)
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="no active MLflow run") as record:
        train_steps(model, opt, digits, 6)
    assert len(record) == 1
    assert mlflow_ema.get_ema(model).step == 6


def test_autolog_is_idempotent_and_disable_removes_every_hook(tracking, digits):
    from torch.optim import optimizer as optim_module
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    originals = (
        MlflowClient.log_metric,
        MlflowClient.log_batch,
        MlflowClient.set_terminated,
        _BaseDataLoaderIter.__next__,
    )
    hooks_before = (
        len(optim_module._global_optimizer_pre_hooks),
        len(optim_module._global_optimizer_post_hooks),
    )
    mlflow_ema.autolog()
    mlflow_ema.autolog(checkpoint_every_n_epochs=2)
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow.start_run():
        train_steps(model, opt, digits, 5)
        assert mlflow_ema.get_ema(model).step == 5  # one update per step, however often autolog was called
    mlflow_ema.autolog(disable=True)
    assert (
        MlflowClient.log_metric,
        MlflowClient.log_batch,
        MlflowClient.set_terminated,
        _BaseDataLoaderIter.__next__,
    ) == originals
    assert (
        len(optim_module._global_optimizer_pre_hooks),
        len(optim_module._global_optimizer_post_hooks),
    ) == hooks_before
    with mlflow.start_run() as run:
        train_steps(make_net(), torch.optim.SGD(model.parameters(), lr=0.1), digits, 3)
    assert logged_models(run.info.run_id) == []
    with pytest.raises(mlflow_ema.MlflowEmaError, match="no model is watched"):
        mlflow_ema.get_ema()


def test_autolog_cannot_tell_then_watch_is_the_explicit_way(tracking, digits):
    mlflow_ema.autolog()
    encoder, head = nn.Linear(64, 16), nn.Linear(16, 10)  # two unrelated modules, one optimizer
    opt = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1)
    x, y = digits

    def one_step():
        loss = nn.functional.cross_entropy(head(torch.relu(encoder(x[:64]))), y[:64])
        opt.zero_grad()
        loss.backward()
        opt.step()

    with mlflow.start_run(), pytest.warns(UserWarning, match="cannot tell which model"):
        one_step()
    mlflow_ema.autolog(disable=True)

    model = nn.Sequential(encoder, nn.ReLU(), head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = mlflow_ema.watch(model, opt, model_factory="helpers:make_net", model_kwargs={"hidden": 16})
    with mlflow.start_run() as run:
        for _ in range(3):
            one_step()
    assert ema.step == 3
    assert [m.tags["mlflow_ema.kind"] for m in logged_models(run.info.run_id)] == ["ema", "raw"]
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["mlflow_ema.model_factory"] == "helpers:make_net"
    assert json.loads(tags["mlflow_ema.model_kwargs"]) == {"hidden": 16}


def test_autolog_finds_the_outermost_module_not_the_trained_part(tracking, digits):
    mlflow_ema.autolog()
    model = make_net()
    model[0].requires_grad_(False)  # linear probing: the optimizer only sees the head
    opt = torch.optim.SGD(model[3].parameters(), lr=0.1)
    with mlflow.start_run():
        train_steps(model, opt, digits, 2)
        assert set(mlflow_ema.get_ema().model_state_dict()) == set(model.state_dict())


def test_non_finite_ema_weights_are_flagged(tracking, digits, tmp_path):
    mlflow_ema.autolog()
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow.start_run() as run:
        train_steps(model, opt, digits, 2)
        with torch.no_grad():
            model[3].bias.fill_(float("nan"))
        mlflow_ema.get_ema().update()
    ema_model = next(m for m in logged_models(run.info.run_id) if m.tags["mlflow_ema.kind"] == "ema")
    assert ema_model.tags["mlflow_ema.all_finite"] == "false"
    assert read_manifest(download(ema_model, tmp_path)).all_finite is False


def test_tied_weights_checkpoint_through_autolog(tracking, tmp_path):
    mlflow_ema.autolog()
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(0))
    with mlflow.start_run() as run:
        for _ in range(3):
            loss = nn.functional.cross_entropy(model.head(model.embed(tokens)), tokens)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for m in logged_models(run.info.run_id):
        state, manifest = load_checkpoint(download(m, tmp_path))
        assert manifest.aliases == {"head.weight": "embed.weight"}
        assert state["head.weight"] is state["embed.weight"]


def test_retry_policy_retries_then_gives_up():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("refused")
        return "ok"

    assert RetryPolicy(attempts=3, backoff=0.01).call("flaky", flaky) == "ok"
    calls.clear()
    with pytest.raises(ConnectionError):
        RetryPolicy(attempts=2, backoff=0.01).call("flaky", flaky)
    assert len(calls) == 2


@pytest.mark.parametrize(
    "kwargs",
    [{"keep_top_k": 2}, {"keep_top_k": 0, "monitor": "m"}, {"mode": "best"}, {"checkpoint_every_n_steps": 0}],
)
def test_autolog_refuses_bad_options(tracking, kwargs):
    with pytest.raises(ValueError):
        mlflow_ema.autolog(**kwargs)


def run_script(*args: str) -> str:
    script = Path(__file__).parent / "train_resumable.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=300
    )
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else done.stderr


def test_a_killed_run_resumes_to_a_bit_identical_ema(tracking, tmp_path):
    full = run_script("full")
    killed = run_script("killed")
    assert mlflow.get_run(killed).info.status == "RUNNING"  # SIGKILLed: nobody ended it
    assert [
        m.tags["mlflow_ema.step"] for m in logged_models(killed) if m.tags["mlflow_ema.kind"] == "raw"
    ] == ["10", "20"]
    assert run_script("resume", killed) == killed
    assert_same_final_checkpoints(full, killed, tmp_path)


def assert_same_final_checkpoints(full: str, resumed: str, tmp_path: Path, step: int = 30) -> None:
    """The raw and EMA checkpoints of ``step`` are bit-identical in both runs."""
    final = {}
    for run_id in (full, resumed):
        models = [m for m in logged_models(run_id) if m.tags["mlflow_ema.step"] == str(step)]
        final[run_id] = {
            m.tags["mlflow_ema.kind"]: load_checkpoint(download(m, tmp_path)).state_dict for m in models
        }
    assert sorted(final[resumed]) == sorted(final[full]) == ["ema", "raw"]
    for kind in ("raw", "ema"):
        for key, value in final[full][kind].items():
            assert torch.equal(final[resumed][kind][key], value), (kind, key)


def test_resume_refuses_a_run_without_training_state(tracking, digits):
    mlflow_ema.autolog()
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow.start_run() as run:
        train_steps(model, opt, digits, 2)
    mlflow_ema.autolog(disable=True)
    with pytest.raises(mlflow_ema.CheckpointError, match="no complete checkpoint with training state"):
        mlflow_ema.resume(make_net(), torch.optim.SGD(model.parameters(), lr=0.1), run_id=run.info.run_id)


def test_large_weights_are_logged_as_safetensors_shards_with_an_index(tracking, digits, tmp_path):
    import hashlib

    from mlflow_ema.checkpoint import INDEX_FILE

    mlflow_ema.autolog(max_shard_size=4096)  # bytes: the 32-wide net's weights take ~10 KB
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow.start_run() as run:
        train_steps(model, opt, digits, 3)
    (ema, raw) = logged_models(run.info.run_id)
    for logged in (ema, raw):
        folder = download(logged, tmp_path / logged.name)
        shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
        assert (
            len(shards) >= 2
            and (folder / INDEX_FILE).is_file()
            and not (folder / "model.safetensors").exists()
        )
        # the sha256 tag reproduces as `sha256sum model-*.safetensors | sha256sum`
        listing = "".join(f"{hashlib.sha256((folder / s).read_bytes()).hexdigest()}  {s}\n" for s in shards)
        assert logged.tags["mlflow_ema.sha256"] == hashlib.sha256(listing.encode()).hexdigest()
        assert logged.tags["mlflow_ema.training_state"] == "false"
    state, _ = load_checkpoint(download(raw, tmp_path / "again"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor)
