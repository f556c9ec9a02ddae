"""The end of a run: the last checkpoint, every upload, then MLflow marks the run ended.

Called from the ``MlflowClient.set_terminated`` patch (``with mlflow.start_run()``
exiting, ``mlflow.end_run()``, Lightning's MLFlowLogger finishing, MLflow's own exit
handler), before MLflow's ``set_terminated`` runs.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import TYPE_CHECKING

from mlflow_ema.checkpointing import forget_run
from mlflow_ema.tags import RUN_TAG_UPLOAD_FAILURES

if TYPE_CHECKING:
    from mlflow_ema.session import Session

_logger = logging.getLogger("mlflow_ema")


def end_of_run(session: Session, run_id: str, status: str | None, tracking_uri: str) -> None:
    """Last checkpoint (``checkpoint_at_end``, a successful run) and post-hoc snapshots, then
    every checkpoint of the run uploaded, ``keep_top_k`` applied and failures reported."""
    forget_run(run_id)  # MLflow has taken it off its stack already: release its ActiveRun object
    finished = status in (None, "FINISHED")
    for w in list(session.watched):
        if w.run_id != run_id or not finished or w.driver == "lightning":  # the callback ends its own
            continue
        if session.config.checkpoint_at_end and w.ema.step > 0:
            session.checkpoints.take(w, run=(run_id, tracking_uri))
        session.checkpoints.take_posthoc(w, run=(run_id, tracking_uri))  # unless taken at this step
    session.checkpoints.complete(run_id=run_id)  # the training state is final now
    if not session.ledger.checkpoints(run_id) and not session.ledger.failures(run_id):
        return
    job = session.upload_job(run_id, tracking_uri)
    session.uploader.flush(run_id)
    if job.keep_top_k is not None and job.monitor:
        try:
            session.uploader.prune(job, final=True)
        except Exception as e:
            _logger.warning("mlflow-ema: pruning checkpoints of run %s failed: %s", run_id, e)
    report_failures(session, run_id, tracking_uri)
    session.ledger.forget(run_id)
    # A model found by autolog belongs to the run that trained it.
    session.watched[:] = [w for w in session.watched if not (w.driver == "autolog" and w.run_id == run_id)]


def report_failures(session: Session, run_id: str, tracking_uri: str) -> None:
    """A warning and the run tag ``mlflow_ema.upload_failures`` for checkpoints not uploaded."""
    failures = session.ledger.failures(run_id)
    if not failures:
        return
    warnings.warn(
        f"mlflow-ema: {len(failures)} checkpoint(s) of run {run_id} could not be uploaded: "
        + "; ".join(failures),
        stacklevel=3,
    )
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri).set_tag(run_id, RUN_TAG_UPLOAD_FAILURES, json.dumps(failures)[:5000])
    except Exception as e:  # the server may still be down: the warning above stands
        _logger.warning("mlflow-ema: could not tag run %s with its upload failures: %s", run_id, e)
