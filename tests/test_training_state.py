"""The training state of a checkpoint is taken at one consistent moment: a resumed run
continues bit for bit whatever its scheduler, and several models stepping at different
rates never keep each other's uploads waiting."""

from __future__ import annotations

import mlflow
import pytest
import torch
from helpers import digits_batches, logged_models, make_mlp
from test_autolog import assert_same_final_checkpoints, download, run_script

import mlflow_ema
from mlflow_ema import load_training_state


@pytest.mark.parametrize("scheduler", ["cosine", "step10"])
def test_a_killed_run_resumes_bit_for_bit_with_its_scheduler(tracking, tmp_path, monkeypatch, scheduler):
    """Cosine annealing stepped per step, and a StepLR whose lr changes on a checkpoint's step:
    the optimizer's lr and the scheduler's state must come from the same moment."""
    monkeypatch.setenv("RESUME_SCHEDULER", scheduler)
    full = run_script("full")
    killed = run_script("killed")
    assert run_script("resume", killed) == killed
    assert_same_final_checkpoints(full, killed, tmp_path)


def test_two_models_stepping_at_different_rates_with_training_state(tracking, tmp_path):
    """A steps every batch, B every other one; each checkpoint's optimizer lr is the one its
    scheduler holds (taken at one moment), and every checkpoint is uploaded."""
    mlflow_ema.autolog(checkpoint_every_n_steps=3, log_training_state=True, max_queue=1)
    models, optimizers, schedulers = {}, {}, {}
    for name, seed in (("a", 0), ("b", 1)):
        models[name] = make_mlp(seed=seed, hidden=16)
        optimizers[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-2)
        schedulers[name] = torch.optim.lr_scheduler.CosineAnnealingLR(optimizers[name], T_max=20)
        mlflow_ema.watch(models[name], optimizers[name], name=name)
    with mlflow.start_run() as run:
        for i, (x, y) in enumerate(digits_batches(18)):
            for name in ("a", "b") if i % 2 else ("a",):
                loss = torch.nn.functional.cross_entropy(models[name](x), y)
                optimizers[name].zero_grad()
                loss.backward()
                optimizers[name].step()
                schedulers[name].step()
    raw = [m for m in logged_models(run.info.run_id) if m.tags["mlflow_ema.kind"] == "raw"]
    assert sorted(m.name for m in raw) == sorted(
        [f"a-raw-step{s}" for s in (3, 6, 9, 12, 15, 18)] + [f"b-raw-step{s}" for s in (3, 6, 9)]
    )
    for m in raw:
        assert str(m.status) == "READY", m.name
        state = load_training_state(download(m, tmp_path))
        lr = state["optimizers"][0]["param_groups"][0]["lr"]
        assert lr == state["schedulers"][0]["_last_lr"][0], m.name
        assert state["schedulers"][0]["last_epoch"] == int(m.tags["mlflow_ema.step"]), m.name
