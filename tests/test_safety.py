"""mlflow-ema's own bugs never break training (mlflow_ema.safety).

A bug is injected into each hook and patch the way a real one would show: an internal
mlflow-ema function raises. Real training on digits, a real sqlite store, no mocks of
MLflow or torch. Each time: the user's call returns normally with the original's result,
one warning, the run tag ``mlflow_ema.errors``, and the part stays off afterwards.

Run as a script under ``torchrun --nproc_per_node 2`` (by the FSDP2 test below), this file
trains a sharded model whose rank 1 fails to write its checkpoint part.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import digits_batches, logged_models, make_mlp, make_net, train_steps
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch import nn

import mlflow_ema
from mlflow_ema import EMA
from mlflow_ema import checkpointing as checkpointing_module
from mlflow_ema import tracking as tracking_module
from mlflow_ema.checkpointing import Checkpoints
from mlflow_ema.ledger import Ledger
from mlflow_ema.routing import MetricRouter
from mlflow_ema.safety import BOUNDARY, RUN_TAG_ERRORS, STRICT_ENV
from mlflow_ema.session import Session
from mlflow_ema.tracking import _SESSION
from mlflow_ema.uploader import Uploader

HERE = Path(__file__).resolve().parent
BUG = "injected bug"


@pytest.fixture(autouse=True)
def not_strict(monkeypatch):
    """These tests want the boundary to catch, not re-raise."""
    monkeypatch.delenv(STRICT_ENV, raising=False)


class Bug:
    """An internal function that raises, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise RuntimeError(BUG)


def inject(monkeypatch, owner, name: str) -> Bug:
    bug = Bug()
    if isinstance(owner, str):  # a module, imported only by the tests that need it
        owner = importlib.import_module(owner)
    monkeypatch.setattr(owner, name, bug)
    return bug


@contextlib.contextmanager
def recorded():
    """The mlflow-ema warnings raised inside the block."""
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield caught
    caught.extend(str(w.message) for w in record if str(w.message).startswith("mlflow-ema:"))


def assert_reported(messages: list[str], run_id: str, part: str) -> None:
    """One warning naming the part, that it is off, and the error; the run's tag lists it."""
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"mlflow-ema: {part} (") and "switched off" in messages[0], messages[0]
    assert messages[0].endswith(f"RuntimeError: {BUG}"), messages[0]
    tags = mlflow.get_run(run_id).data.tags
    assert json.loads(tags[RUN_TAG_ERRORS]) == [f"{part}: RuntimeError: {BUG}"]
    assert not BOUNDARY.is_on(part)


@pytest.fixture(scope="module")
def untouched(digits) -> dict[str, torch.Tensor]:
    """The weights 6 SGD steps give without mlflow-ema."""
    _SESSION.reset()  # no hooks while it trains
    model = make_net()
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), digits, 6)
    return model.state_dict()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- MLflow patches ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["prefixed", "observe"])  # before MLflow is called / after
def test_a_bug_in_the_log_metric_patch_still_logs_the_metric(tracking, digits, monkeypatch, where):
    mlflow_ema.autolog()
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow.start_run() as run:
        train_steps(model, opt, digits, 3)
        # MLflow's own refusals propagate unchanged, and are no bug of mlflow-ema's
        with recorded() as messages, pytest.raises(MlflowException, match="Invalid value"):
            mlflow.log_metric("val_acc", "not a number", step=3)
        assert messages == [] and BOUNDARY.is_on("log_metric")
        bug = inject(monkeypatch, MetricRouter if where == "prefixed" else Session, where)
        with recorded() as messages:
            assert mlflow.log_metric("val_acc", 0.5, step=3) is None  # what MLflow returns
            mlflow.log_metric("val_acc", 0.6, step=4)  # straight to MLflow: no second warning
        with pytest.raises(MlflowException, match="Invalid value"):
            mlflow.log_metric("val_acc", "still not a number", step=5)
    assert bug.calls == 1
    assert_reported(messages, run.info.run_id, "log_metric")
    history = MlflowClient().get_metric_history(run.info.run_id, "val_acc")
    assert [(m.step, m.value) for m in history] == [(3, 0.5), (4, 0.6)]  # each logged once, by its name
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"
    assert [m.name for m in logged_models(run.info.run_id)] == ["ema-step3", "raw-step3"]  # the rest goes on


def test_a_bug_in_the_log_batch_patch_still_logs_the_metrics(tracking, digits, monkeypatch):
    mlflow_ema.autolog()
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bug = inject(monkeypatch, Ledger, "observe_metric")
    with mlflow.start_run() as run, recorded() as messages:
        train_steps(model, opt, digits, 3)
        mlflow.log_metrics({"val_acc": 0.5, "val_loss": 1.5}, step=3)
        mlflow.log_metrics({"val_acc": 0.7}, step=4)
    assert bug.calls == 1
    assert_reported(messages, run.info.run_id, "log_batch")
    client = MlflowClient()
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0.5, 0.7]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1.5]


def test_a_bug_at_run_end_still_ends_the_run(tracking, digits, monkeypatch):
    mlflow_ema.autolog()
    bug = inject(monkeypatch, "mlflow_ema.run_end", "end_of_run")
    runs = []
    with recorded() as messages:
        for _ in range(2):  # the second run ends straight through MLflow
            model = make_net()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            with mlflow.start_run() as run:
                train_steps(model, opt, digits, 3)
            runs.append(run.info.run_id)
            assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"
            assert mlflow.active_run() is None
    assert bug.calls == 1
    assert_reported(messages, runs[0], "run_end")
    assert RUN_TAG_ERRORS not in mlflow.get_run(runs[1]).data.tags  # nothing failed in that one


# -- torch hooks and patches ------------------------------------------------------------------------


def test_a_bug_in_model_discovery_leaves_training_alone(tracking, digits, monkeypatch, untouched):
    mlflow_ema.autolog()
    bug = inject(monkeypatch, Session, "resolve")
    model = make_net()
    with mlflow.start_run() as run, recorded() as messages:
        train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), digits, 6)
        other = make_net()  # another optimizer: no second look either
        train_steps(other, torch.optim.SGD(other.parameters(), lr=0.1), digits, 1)
    assert bug.calls == 1
    assert_reported(messages, run.info.run_id, "optimizer_pre_step")
    assert same(model.state_dict(), untouched)
    assert logged_models(run.info.run_id) == []
    with pytest.raises(mlflow_ema.MlflowEmaError, match="no model is watched"):
        mlflow_ema.get_ema()


@pytest.mark.parametrize(
    ("owner", "name", "options"),
    [
        (EMA, "update", {}),
        (Ledger, "add_checkpoint", {"checkpoint_every_n_steps": 2, "checkpoint_at_end": False}),
    ],
    ids=["ema-update", "step-checkpoint"],
)
def test_a_bug_after_the_optimizer_step_leaves_training_alone(
    tracking, digits, monkeypatch, untouched, owner, name, options
):
    mlflow_ema.autolog(**options)
    bug = inject(monkeypatch, owner, name)
    model = make_net()
    with mlflow.start_run() as run, recorded() as messages:
        train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), digits, 6)
    assert bug.calls == 1
    assert_reported(messages, run.info.run_id, "optimizer_post_step")
    assert same(model.state_dict(), untouched)  # every step ran, with the optimizer's own result
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"


def test_a_bug_in_watchs_optimizer_hooks_leaves_training_alone(tracking, digits, monkeypatch, untouched):
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = mlflow_ema.watch(model, opt)
    bug = inject(monkeypatch, EMA, "update")
    with mlflow.start_run() as run, recorded() as messages:
        train_steps(model, opt, digits, 6)
    assert bug.calls == 1 and ema.step == 0
    assert_reported(messages, run.info.run_id, "watch_hooks")
    assert same(model.state_dict(), untouched)


def test_a_bug_in_epoch_detection_leaves_the_epoch_loop_alone(tracking, digits, monkeypatch):
    mlflow_ema.autolog(checkpoint_every_n_epochs=1)
    bug = inject(monkeypatch, Session, "on_epoch_end")
    x, y = digits
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=300)
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = 0
    with mlflow.start_run() as run, recorded() as messages:
        for _ in range(3):
            for xb, yb in loader:  # 6 batches
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                batches += 1
        exhausted = iter(loader)
        assert len(list(exhausted)) == 6
        with pytest.raises(StopIteration):  # the iterator's own end still propagates
            next(exhausted)
        assert mlflow_ema.get_ema(model).step == 18  # the EMA goes on: only epoch detection is off
    assert batches == 18 and bug.calls == 1
    assert_reported(messages, run.info.run_id, "epoch_detection")
    assert [m.name for m in logged_models(run.info.run_id)] == ["ema-step18", "raw-step18"]


def test_a_bug_in_the_exit_flush_is_reported_and_the_exit_goes_on(tracking, digits, monkeypatch):
    mlflow_ema.autolog()
    model = make_net()
    with mlflow.start_run() as run:
        train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), digits, 3)
        with monkeypatch.context() as patch, recorded() as messages:
            bug = inject(patch, Uploader, "flush")
            assert tracking_module._flush_at_exit() is None  # what atexit calls
            tracking_module._flush_at_exit()
        assert bug.calls == 1
    assert_reported(messages, run.info.run_id, "exit_flush")
    assert [m.name for m in logged_models(run.info.run_id)] == ["ema-step3", "raw-step3"]


# -- strict mode --------------------------------------------------------------------------------------


def test_strict_mode_re_raises_and_the_run_still_ends(tracking, digits, monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "1")
    mlflow_ema.autolog()
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with monkeypatch.context() as patch, mlflow.start_run():
        inject(patch, EMA, "update")
        with recorded() as messages, pytest.raises(RuntimeError, match=BUG):
            train_steps(model, opt, digits, 1)
    assert messages == [] and BOUNDARY.is_on("optimizer_post_step")
    inject(monkeypatch, "mlflow_ema.run_end", "end_of_run")
    run = mlflow.start_run()
    with pytest.raises(RuntimeError, match=BUG):
        mlflow.end_run()
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"  # MLflow's own end ran anyway
    assert mlflow.active_run() is None


# -- Lightning --------------------------------------------------------------------------------------


@pytest.fixture
def lightning_setup(digits):
    """test_lightning's module, loaders and Trainer options, one intra-op thread."""
    import test_lightning as tl
    from torch.utils.data import DataLoader, TensorDataset

    x, y = digits
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    loaders = (
        DataLoader(TensorDataset(x[order[:cut]], y[order[:cut]]), batch_size=96),
        DataLoader(TensorDataset(x[order[cut:]], y[order[cut:]]), batch_size=512),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tl, loaders
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lightning_untouched(digits) -> dict[str, torch.Tensor]:
    """The weights two epochs give without mlflow-ema."""
    import test_lightning as tl

    _SESSION.reset()
    from torch.utils.data import DataLoader, TensorDataset

    x, y = digits
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tl.make_model()
        tl.make_trainer().fit(
            model,
            DataLoader(TensorDataset(x[order[:cut]], y[order[:cut]]), batch_size=96),
            DataLoader(TensorDataset(x[order[cut:]], y[order[cut:]]), batch_size=512),
        )
    finally:
        torch.set_num_threads(threads)
    return {k: v.clone() for k, v in model.state_dict().items()}


LIGHTNING_BUGS = {
    "setup": (Session, "add"),
    "on_train_batch_end": (EMA, "update"),
    "on_validation_start": (EMA, "swap"),
    "on_validation_end": ("mlflow_ema.lightning", "_validation_metric_names"),  # with EMA weights in
    "on_fit_end": (Checkpoints, "take"),
}


@pytest.mark.parametrize("hook", list(LIGHTNING_BUGS))
def test_a_bug_in_a_lightning_hook_leaves_fit_alone(
    tracking, lightning_setup, lightning_untouched, monkeypatch, hook
):
    from mlflow_ema.lightning import EMACallback

    tl, loaders = lightning_setup
    owner, name = LIGHTNING_BUGS[hook]
    bug = inject(monkeypatch, owner, name)
    logger = tl.mlflow_logger(tracking)
    model = tl.make_model()
    trainer = tl.make_trainer(callbacks=[EMACallback()], logger=logger)
    with recorded() as messages:
        trainer.fit(model, *loaders)
        assert trainer.global_step == 30  # every batch of both epochs
        again = EMACallback()
        tl.make_trainer(callbacks=[again], logger=tl.mlflow_logger(tracking)).fit(tl.make_model(), *loaders)
    assert bug.calls == 1 and again.ema is None  # off: the second fit never saw it
    assert_reported(messages, logger.run_id, "lightning_callback")
    assert same(model.state_dict(), lightning_untouched)  # raw weights all along, as without the callback
    assert mlflow.get_run(logger.run_id).info.status == "FINISHED"
    assert _SESSION.watched == [] and not _SESSION.routing.prefixing


def test_a_bug_in_the_lightning_entry_point_still_builds_the_trainer(tracking, lightning_setup, monkeypatch):
    from mlflow_ema.lightning import EMACallback

    tl, _ = lightning_setup
    mlflow_ema.autolog()
    bug = inject(monkeypatch, EMACallback, "__init__")
    with mlflow.start_run() as run, recorded() as messages:
        trainers = [tl.make_trainer(), tl.make_trainer()]
    assert bug.calls == 1
    assert [cb for t in trainers for cb in t.callbacks if isinstance(cb, EMACallback)] == []
    assert_reported(messages, run.info.run_id, "lightning_entry_point")


def test_lightning_with_training_state_does_not_wait_forever_at_fit_end(tracking, lightning_setup):
    """The checkpoint taken when fit ends waits for the scheduler states, which no later
    optimizer step takes: the callback takes them before it waits for the uploads."""
    tl, loaders = lightning_setup
    mlflow_ema.autolog(log_training_state=True, checkpoint_every_n_epochs=1)
    logger = tl.mlflow_logger(tracking)
    tl.make_trainer(logger=logger, max_epochs=1).fit(tl.make_model(), *loaders)
    (raw,) = [m for m in logged_models(logger.run_id) if m.tags["mlflow_ema.kind"] == "raw"]
    assert raw.tags["mlflow_ema.training_state"] == "true"


# -- FSDP2: a failure on one rank switches the collective checkpoint off on every rank ----------------


def test_fsdp2_checkpoint_failing_on_one_rank_is_switched_off_on_every_rank(tracking, tmp_path):
    from conftest import free_port

    out, parts = tmp_path / "out", tmp_path / "parts"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    env.pop(STRICT_ENV, None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         __file__, "--out", str(out), "--parts-dir", str(parts)],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["steps"] for r in ranks] == [12, 12]  # training went on, on both ranks
    (failed,), (told,) = ranks[1]["warnings"], ranks[0]["warnings"]
    assert failed.startswith("mlflow-ema: sharded_checkpoint (") and "failed and is switched off" in failed
    assert told.startswith("mlflow-ema: sharded_checkpoint (") and "off on every rank" in told
    assert failed.endswith("RuntimeError: no space left on device") and told.endswith(
        "failure on rank 1; training goes on: RuntimeError: no space left on device"
    )
    assert ranks[0]["settled"] == ranks[1]["settled"] == ["sharded_checkpoint"]
    run_id = ranks[0]["run_id"]
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.tags[RUN_TAG_ERRORS]) == [
        "sharded_checkpoint: rank 1: RuntimeError: no space left on device"
    ]
    assert logged_models(run_id) == []  # step 5 failed; steps 10 and 12 were never tried
    assert list(parts.iterdir()) == []  # rank 0's part of step 5 is not left behind
    # the weights are what one process computes on the whole batches: training was untouched
    model = make_mlp(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in digits_batches(12):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    got = torch.load(out / "raw.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6)


def _fsdp_main() -> None:
    import argparse
    import datetime

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts-dir", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))  # a hang fails, not waits
    rank, world = dist.get_rank(), dist.get_world_size()
    args.out.mkdir(parents=True, exist_ok=True)
    model = make_mlp(seed=0)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    trained = fully_shard(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
    if rank == 1:  # this rank's disk is full: writing its part of a checkpoint fails

        def full_disk(folder, state_dict):
            raise RuntimeError("no space left on device")

        checkpointing_module.save_part = full_disk
    mlflow_ema.autolog(
        decay=0.8, checkpoint_every_n_steps=5, checkpoint_at_end=False, sharded_save_dir=args.parts_dir
    )
    steps = 0
    run = mlflow.start_run() if rank == 0 else contextlib.nullcontext()
    with warnings.catch_warnings(record=True) as caught, run:
        warnings.simplefilter("always")
        for x, y in digits_batches(12):
            loss = nn.functional.cross_entropy(trained(x[rank::world]), y[rank::world])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
        mlflow_ema.log_checkpoint()  # every rank, as documented: off everywhere, so nobody waits
    raw = {k: v.full_tensor() for k, v in trained.state_dict().items()}
    if rank == 0:
        torch.save(raw, args.out / "raw.pt")
    result = {
        "steps": steps,
        "run_id": run.info.run_id if rank == 0 else None,
        "warnings": [str(w.message) for w in caught if str(w.message).startswith("mlflow-ema:")],
        "settled": sorted(BOUNDARY.settled),
    }
    dist.barrier()
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    _fsdp_main()
