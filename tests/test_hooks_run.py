"""The run a step belongs to: resolved once per MLflow run, not at every optimizer step, yet
right when runs start and end between steps, nest, or live in other threads."""

from __future__ import annotations

import threading

import mlflow
import torch
from helpers import logged_models, make_net, train_steps

import mlflow_ema
from mlflow_ema import checkpointing


def raw_steps(run_id: str) -> list[str]:
    return [m.tags["mlflow_ema.step"] for m in logged_models(run_id) if m.tags["mlflow_ema.kind"] == "raw"]


def test_the_run_is_resolved_once_per_run_not_per_step(tracking, digits, monkeypatch):
    calls = []
    real = mlflow.get_tracking_uri
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: calls.append(1) or real())
    mlflow_ema.autolog(checkpoint_at_end=False)
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        with mlflow.start_run():
            train_steps(model, opt, digits, 20)
    assert len(calls) == 2
    assert checkpointing._resolved is None  # the ended run's ActiveRun object is let go


def test_runs_started_ended_and_nested_between_steps(tracking, digits):
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mlflow_ema.watch(model, opt)
    with mlflow.start_run() as parent:
        train_steps(model, opt, digits, 3)
        with mlflow.start_run(nested=True) as child:
            train_steps(model, opt, digits, 3, start=3)
        train_steps(model, opt, digits, 2, start=6)
    train_steps(model, opt, digits, 1, start=8)  # no run: no checkpoint, the EMA goes on
    with mlflow.start_run() as other:
        train_steps(model, opt, digits, 2, start=9)
    assert raw_steps(child.info.run_id) == ["6"]
    assert raw_steps(parent.info.run_id) == ["8"]
    assert raw_steps(other.info.run_id) == ["11"]


def test_a_run_in_another_thread_between_two_steps(tracking, digits):
    """MLflow's active run is per thread: a step in each thread, in turn, finds its own."""
    main, side = make_net(seed=0), make_net(seed=1)
    main_opt, side_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (main, side))
    mlflow_ema.watch(main, main_opt, name="main")
    mlflow_ema.watch(side, side_opt, name="side")
    found = {}

    def in_thread() -> None:
        with mlflow.start_run() as run:
            train_steps(side, side_opt, digits, 2)
        found["side"] = run.info.run_id

    with mlflow.start_run() as run:
        train_steps(main, main_opt, digits, 2)
        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
        train_steps(main, main_opt, digits, 2, start=2)
    assert [m.name for m in logged_models(found["side"])] == ["side-ema-step2", "side-raw-step2"]
    assert [m.name for m in logged_models(run.info.run_id)] == ["main-ema-step4", "main-raw-step4"]
