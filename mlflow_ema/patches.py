"""Every patch and hook mlflow-ema installs in MLflow and torch, behind the safety boundary.

=====================================  ========================================================
installed in                           why
=====================================  ========================================================
``MlflowClient.log_metric``            the ``ema/`` prefix; tell the ledger which checkpoint
``MlflowClient.log_batch``             a metric describes (``mlflow.log_metric(s)`` end here)
``MlflowClient.set_terminated``        the last checkpoint and every upload before a run ends
torch's global optimizer step hooks    find the model at an optimizer's first step; update the
                                       EMA and take step checkpoints after each step (autolog)
an optimizer's own step hooks          the same for ``mlflow_ema.watch(model, optimizer)``
``_BaseDataLoaderIter.__next__``       an exhausted iterator the optimizer stepped over ends an
                                       epoch (``checkpoint_every_n_epochs``)
=====================================  ========================================================

The Lightning callback and its entry point are guarded in :mod:`mlflow_ema.lightning`. Each
runs behind :data:`mlflow_ema.safety.BOUNDARY`: an error of mlflow-ema's own switches that
part off with one warning and never breaks the user's call.
"""

from __future__ import annotations

import inspect
import time
from typing import TYPE_CHECKING, Any

from mlflow_ema.safety import BOUNDARY, EPOCHS, LOG_BATCH, LOG_METRIC, POST_STEP, PRE_STEP, RUN_END, WATCH

if TYPE_CHECKING:
    from mlflow_ema.session import Session
    from mlflow_ema.watched import Watched


class Patches:
    """What is installed, so that ``autolog(disable=True)`` removes all of it."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._patched: list[tuple[Any, str, Any]] = []  # (owner, attribute, original)
        self._global_hooks: list[Any] = []  # torch's handles
        self._optimizer_hooks: list[Any] = []  # watch()'s handles

    def install_run_hooks(self) -> None:
        """The MLflow patches autolog, watch and the Lightning callback all need: metric
        routing and the run's end. Idempotent."""
        if self._patched and any(name == "set_terminated" for _, name, _ in self._patched):
            return
        from mlflow import MlflowClient

        self._patch(MlflowClient, "log_metric", _metric_patch(self.session, MlflowClient.log_metric))
        self._patch(MlflowClient, "log_batch", _batch_patch(self.session, MlflowClient.log_batch))
        self._patch(MlflowClient, "set_terminated", _run_end_patch(self.session, MlflowClient.set_terminated))

    def install_step_hooks(self) -> None:
        """autolog's global optimizer hooks and epoch detection. Idempotent."""
        if self._global_hooks:
            return
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._global_hooks = [
            register_optimizer_step_pre_hook(BOUNDARY.hook(PRE_STEP, self.session.before_step)),
            register_optimizer_step_post_hook(BOUNDARY.hook(POST_STEP, self.session.after_step)),
        ]
        self._patch_data_loader()

    def hook_optimizer(self, optimizer: Any, w: Watched) -> None:
        """``watch()``: this optimizer's steps drive ``w``'s EMA."""
        session = self.session
        self._optimizer_hooks += [
            optimizer.register_step_pre_hook(BOUNDARY.hook(WATCH, lambda *_: session.before_own_step(w))),
            optimizer.register_step_post_hook(
                BOUNDARY.hook(WATCH, lambda *_: session.after_optimizer_step(w))
            ),
        ]

    def uninstall(self) -> None:
        for handle in [*self._global_hooks, *self._optimizer_hooks]:
            handle.remove()
        self._global_hooks, self._optimizer_hooks = [], []
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched = []

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        self._patched.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, replacement)

    def _patch_data_loader(self) -> None:
        from torch.utils.data.dataloader import _BaseDataLoaderIter

        original = _BaseDataLoaderIter.__next__
        session, off = self.session, BOUNDARY.off

        def patched_next(self_iter: Any) -> Any:
            if EPOCHS in off:  # once per batch: one dict lookup
                return original(self_iter)
            if getattr(self_iter, "_num_yielded", 1) == 0:
                BOUNDARY.call(EPOCHS, _iterator_started, session, self_iter)
            try:
                return original(self_iter)
            except StopIteration:  # propagates, whatever happens at the epoch's end
                BOUNDARY.call(EPOCHS, _iterator_done, session, self_iter)
                raise

        self._patch(_BaseDataLoaderIter, "__next__", patched_next)


def _iterator_started(session: Session, iterator: Any) -> None:
    iterator._mlflow_ema_steps = session.optimizer_steps


def _iterator_done(session: Session, iterator: Any) -> None:
    """A DataLoader iterator is exhausted: an epoch ended if the optimizer stepped meanwhile."""
    started = getattr(iterator, "_mlflow_ema_steps", None)
    if started is not None and session.optimizer_steps > started:
        iterator._mlflow_ema_steps = None
        session.on_epoch_end()


def _client_run(arguments: dict[str, Any]) -> tuple[str, str]:
    """The run a patched ``MlflowClient`` call writes to: tag it when mlflow-ema fails there."""
    return arguments["run_id"], arguments["self"].tracking_uri


def _metric_patch(session: Session, log_metric: Any) -> Any:
    """``MlflowClient.log_metric``: the ``ema/`` prefix, a known timestamp, then the ledger."""
    signature = inspect.signature(log_metric)

    def prepare(args: tuple, kwargs: dict) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return None  # the caller's mistake: MLflow reports it
        bound.apply_defaults()
        a = bound.arguments
        a["key"] = session.routing.prefixed(a["key"])
        a["timestamp"] = a["timestamp"] or int(time.time() * 1000)  # known, so links dedupe
        return bound

    def after(a: dict[str, Any]) -> None:
        session.observe(a["run_id"], [(a["key"], a["value"], a["step"] or 0, a["timestamp"])], a["self"])

    return BOUNDARY.patch(
        LOG_METRIC, log_metric, prepare, after, bypass=session.on_upload_thread, run_of=_client_run
    )


def _batch_patch(session: Session, log_batch: Any) -> Any:
    """``MlflowClient.log_batch``: as :func:`_metric_patch`, for each metric."""
    signature = inspect.signature(log_batch)

    def prepare(args: tuple, kwargs: dict) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        a = bound.arguments
        a["metrics"] = [_renamed(m, session.routing.prefixed(m.key)) for m in a["metrics"] or ()]
        return bound

    def after(a: dict[str, Any]) -> None:
        observed = [(m.key, m.value, m.step, m.timestamp) for m in a["metrics"] if m.model_id is None]
        session.observe(a["run_id"], observed, a["self"])

    return BOUNDARY.patch(
        LOG_BATCH, log_batch, prepare, after, bypass=session.on_upload_thread, run_of=_client_run
    )


def _run_end_patch(session: Session, set_terminated: Any) -> Any:
    """``MlflowClient.set_terminated``: the last checkpoint and every upload first. MLflow's
    own ``set_terminated`` always runs, so a run never stays RUNNING because of mlflow-ema."""
    from mlflow_ema import run_end

    def patched_set_terminated(
        self_client: Any, run_id: str, status: str | None = None, end_time: int | None = None
    ) -> Any:
        try:
            BOUNDARY.call(RUN_END, run_end.end_of_run, session, run_id, status, self_client.tracking_uri,
                          run=lambda: (run_id, self_client.tracking_uri))  # fmt: skip
        finally:  # strict mode re-raises, after the run is marked terminated
            result = set_terminated(self_client, run_id, status, end_time)
        return result

    return patched_set_terminated


def _renamed(metric: Any, key: str) -> Any:
    from mlflow.entities import Metric

    if key == metric.key:
        return metric
    return Metric(key, metric.value, metric.timestamp, metric.step, dataset_name=metric.dataset_name,
                  dataset_digest=metric.dataset_digest, model_id=metric.model_id, run_id=metric.run_id)  # fmt: skip
