"""Faults during training: the tracking server goes away, and ranks other than 0."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import warnings
from pathlib import Path

import mlflow
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, start_server, stop_server
from helpers import make_net, train_steps
from mlflow import MlflowClient
from torch import nn

import mlflow_ema
from mlflow_ema import load_checkpoint
from mlflow_ema.tracking import _SESSION
from mlflow_ema.uploader import RetryPolicy


def test_server_unreachable_mid_training_loses_nothing(tmp_path, monkeypatch, digits):
    proc, uri = start_server(tmp_path / "server")
    try:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("faults")
        _SESSION.reset()
        _SESSION.uploader.retry = RetryPolicy(attempts=2, backoff=0.1)
        mlflow_ema.autolog(checkpoint_every_n_steps=5)
        model = make_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = mlflow.start_run()
        train_steps(model, opt, digits, 5)
        assert mlflow_ema.flush(timeout=60)
        models = MlflowClient().search_logged_models(experiment_ids=[run.info.experiment_id])
        assert sorted(m.name for m in models) == ["ema-step5", "raw-step5"]

        stop_server(proc)
        train_steps(model, opt, digits, 5, start=5)  # training goes on while uploads fail
        assert mlflow_ema.get_ema().step == 10
        with (
            pytest.warns(UserWarning, match=r"2 checkpoint\(s\) of run .* could not be uploaded"),
            pytest.raises(Exception),  # noqa: B017 - MLflow's own end_run cannot reach the server
        ):
            mlflow.end_run()
        kept = tmp_path / "mlflow-ema-unsent" / run.info.run_id
        assert sorted(p.name for p in kept.iterdir()) == ["ema-step10", "raw-step10"]
        state, manifest = load_checkpoint(kept / "raw-step10")  # complete and verified
        assert manifest.step == 10
        for key, value in model.state_dict().items():
            assert torch.equal(state[key], value), key
    finally:
        stop_server(proc)
        while mlflow.active_run():
            with contextlib.suppress(Exception):
                mlflow.end_run()
        _SESSION.reset()
        mlflow.set_tracking_uri(None)


def _rank_main(rank: int, world: int, port: int, uri: str, results) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    digits = torch.tensor(x / 16.0, dtype=torch.float32)[rank::world], torch.tensor(y)[rank::world]
    model = nn.parallel.DistributedDataParallel(make_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = mlflow_ema.watch(model, opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mlflow.start_run() if rank == 0 else contextlib.nullcontext() as run:
            train_steps(model, opt, digits, 4)
            mlflow_ema.log_checkpoint(metrics={"val_acc": 0.5})  # called on every rank
            mlflow_ema.flush()
    messages = [str(w.message) for w in caught if "mlflow-ema" in str(w.message)]
    results.put((rank, run.info.run_id if run else None, ema.step, messages))
    dist.destroy_process_group()


def test_only_rank_zero_writes_to_mlflow(tracking):
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.spawn(_rank_main, args=(2, free_port(), tracking, results), nprocs=2, join=True)
    by_rank = {}
    while not results.empty():
        rank, run_id, steps, messages = results.get()
        by_rank[rank] = (run_id, steps, messages)
    assert by_rank[0][1] == by_rank[1][1] == 4  # every rank keeps the EMA
    assert by_rank[1] == (None, 4, [])  # rank 1: no run, no warning, nothing written
    run_id = by_rank[0][0]
    models = MlflowClient().search_logged_models(
        experiment_ids=["0"], filter_string=f"source_run_id = '{run_id}'"
    )
    assert sorted(m.name for m in models) == ["ema-step4", "raw-step4"]
    assert len(MlflowClient().search_runs(experiment_ids=["0"])) == 1


def test_a_failed_upload_never_leaves_a_ready_checkpoint(tracking, digits, monkeypatch, tmp_path):
    def broken_upload(self, model_id, local_dir, artifact_path=None):
        raise OSError("connection reset while uploading model.safetensors")

    monkeypatch.setattr(MlflowClient, "log_model_artifacts", broken_upload)
    _SESSION.uploader.retry = RetryPolicy(attempts=2, backoff=0.01)
    mlflow_ema.autolog()
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="could not be uploaded"), mlflow.start_run() as run:
        train_steps(model, opt, digits, 3)
    models = MlflowClient().search_logged_models(experiment_ids=[run.info.experiment_id])
    assert sorted((m.name, str(m.status)) for m in models) == [
        ("ema-step3", "FAILED"),
        ("raw-step3", "FAILED"),
    ]
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert "connection reset" in tags["mlflow_ema.upload_failures"]
    assert sorted(p.name for p in (tmp_path / "mlflow-ema-unsent" / run.info.run_id).iterdir()) == [
        "ema-step3",
        "raw-step3",
    ]


SCRIPT_WITHOUT_END_RUN = """
import mlflow, torch, mlflow_ema
from helpers import make_net
mlflow_ema.autolog()
model = make_net()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
run = mlflow.start_run()
print(run.info.run_id, flush=True)
for _ in range(3):
    loss = model(torch.randn(16, 64)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
# no end_run: MLflow ends the run at interpreter exit, and its checkpoints are uploaded first
"""


def test_checkpoints_are_flushed_at_interpreter_exit(tracking, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT_WITHOUT_END_RUN], capture_output=True, text=True, env=env, check=True
    )
    run_id = out.stdout.split()[0]
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    models = MlflowClient().search_logged_models(experiment_ids=[run.info.experiment_id])
    assert sorted((m.name, str(m.status)) for m in models) == [("ema-step3", "READY"), ("raw-step3", "READY")]


def _descendants(pid: int) -> list[int]:
    """The process and its children, from /proc (the server's workers are its children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def test_a_server_that_stops_answering_makes_training_wait_and_say_so_once(tmp_path, monkeypatch, digits):
    """SIGSTOP freezes the server (an outage without errors); SIGCONT after 8 s ends it."""
    import threading

    proc, uri = start_server(tmp_path / "server")
    try:
        monkeypatch.chdir(tmp_path)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("slow")
        _SESSION.reset()
        mlflow_ema.autolog(checkpoint_every_n_steps=1, max_queue=1)
        model = make_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with mlflow.start_run() as run:
            train_steps(model, opt, digits, 1)
            assert mlflow_ema.flush(timeout=60)
            frozen = _descendants(proc.pid)
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            thaw = threading.Timer(8, lambda: [os.kill(pid, signal.SIGCONT) for pid in frozen])
            thaw.start()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_steps(model, opt, digits, 4, start=1)  # the 3rd checkpoint waits for a slot
            thaw.join()
        waits = [str(w.message) for w in caught if "upload slot" in str(w.message)]
        assert len(waits) == 1, waits
        assert re.search(
            r"waited \d+ s for an upload slot: 1 checkpoint\(s\) are queued \(max_queue=1\)", waits[0]
        )
        assert uri in waits[0] and "slow or unreachable" in waits[0]
        models = MlflowClient().search_logged_models(experiment_ids=[run.info.experiment_id])
        assert sorted(m.name for m in models if m.status.name == "READY") == sorted(
            f"{k}-step{s}" for k in ("raw", "ema") for s in range(1, 6)
        )  # nothing lost
    finally:
        for pid in _descendants(proc.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        stop_server(proc)
        _SESSION.reset()
        mlflow.set_tracking_uri(None)
