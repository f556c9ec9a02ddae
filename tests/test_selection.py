"""Ranking checkpoints: ties are broken the same way every time."""

from __future__ import annotations

import mlflow

from mlflow_ema.selection import select


def checkpoint(run_id: str, step: int, value: float) -> str:
    model = mlflow.initialize_logged_model(
        name=f"ema-step{step}",
        source_run_id=run_id,
        experiment_id=mlflow.get_run(run_id).info.experiment_id,
        tags={"mlflow_ema.kind": "ema", "mlflow_ema.step": str(step)},
    )
    mlflow.log_metric("ema/val_acc", value, step=step, model_id=model.model_id, run_id=run_id)
    mlflow.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def test_ties_go_to_the_run_started_first_then_to_the_later_checkpoint(tracking):
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("ties")
    # Started in this order, created in the reverse one: run ids (random) decide nothing.
    starts = {"second": 2_000, "first": 1_000, "third": 3_000}
    runs = {
        name: client.create_run(experiment, start_time=t, run_name=name).info.run_id
        for name, t in starts.items()
    }
    for run_id in runs.values():
        checkpoint(run_id, 10, 0.9)
        client.set_terminated(run_id)
    late = checkpoint(runs["first"], 20, 0.9)  # the same value later in the run
    ranked = select(experiments=["ties"], metric="ema/val_acc", top_k=3).candidates
    assert [c.run_name for c in ranked] == ["first", "second", "third"]
    assert ranked[0].model_id == late
