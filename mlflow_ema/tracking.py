"""``mlflow_ema.autolog()`` and the explicit API behind it: ``watch``, ``log_checkpoint``,
``swap``, ``flush`` and ``resume``.

How autolog finds the model. Torch optimizers do not know their module, so at an
optimizer's first ``step()`` (a global step *pre*-hook, so the EMA and its init
fingerprint see the weights before the first update) autolog looks among the live
``nn.Module`` objects for those that own the parameters the optimizer updates, and
takes the outermost (unwrapping DDP and ``torch.compile``). When there is none, or
more than one, it warns once and leaves that optimizer alone: call
``mlflow_ema.watch(model, optimizer)``, which is also the explicit, no-magic way.

What happens then, per optimizer step (a global step *post*-hook): ``ema.update()``
and, every ``checkpoint_every_n_steps``, a checkpoint. ``checkpoint_every_n_epochs``
counts epochs as exhausted ``DataLoader`` iterators during which the optimizer
stepped. When a run ends (``with mlflow.start_run()`` exits, ``mlflow.end_run()``, or
Lightning's MLFlowLogger finishing), a last checkpoint is taken (``checkpoint_at_end``)
and every checkpoint of the run is uploaded before the run is marked finished.

Every hook and patch runs behind :mod:`mlflow_ema.safety`'s boundary: an error of
mlflow-ema's own switches that part off with one warning and the run tag
``mlflow_ema.errors``, and never breaks the training step, the metric logged or the run's end.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import inspect
import json
import logging
import random
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlflow_ema.architecture import RUN_TAG_MODEL_CLASS, RUN_TAG_MODEL_FACTORY, RUN_TAG_MODEL_KWARGS
from mlflow_ema.checkpoint import DEFAULT_MAX_SHARD_SIZE, parse_size
from mlflow_ema.ema import EMA, is_sharded, unwrap_model
from mlflow_ema.errors import CheckpointError, IncompatibleModelError, MlflowEmaError
from mlflow_ema.ledger import EMA_PREFIX, Ledger
from mlflow_ema.safety import (
    BOUNDARY,
    EPOCHS,
    EXIT_FLUSH,
    LOG_BATCH,
    LOG_METRIC,
    POST_STEP,
    PRE_STEP,
    RUN_END,
    SHARDED,
    WATCH,
)
from mlflow_ema.schedules import DecaySchedule, WarmupDecay
from mlflow_ema.snapshot import (
    Later,
    MergedParts,
    Snapshot,
    gather_sharded,
    save_part,
    take_snapshot,
)
from mlflow_ema.uploader import (
    RUN_TAG_UPLOAD_FAILURES,
    TAG_KIND,
    TAG_MODEL,
    TAG_STEP,
    TAG_TRAINING_STATE,
    CheckpointPart,
    Uploader,
    UploadJob,
)

_logger = logging.getLogger("mlflow_ema")

NO_RUN_MESSAGE = (
    "no active MLflow run: the EMA is kept but no checkpoint is logged "
    "(train inside `with mlflow.start_run():`)"
)
_SCHEDULER_TYPES = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
_COUNTERS = {"epoch", "step", "global_step"}  # bookkeeping Lightning logs: no ema/ prefix


@dataclasses.dataclass
class AutologConfig:
    decay: float | DecaySchedule = dataclasses.field(
        default_factory=lambda: WarmupDecay(decay=0.9999, power=3 / 4)
    )
    update_every: int = 1
    start_step: int = 0
    ema_dtype: torch.dtype | None = None
    ema_device: str | torch.device | None = None
    checkpoint_every_n_steps: int | None = None
    checkpoint_every_n_epochs: int | None = None
    checkpoint_at_end: bool = True
    keep_top_k: int | None = None
    monitor: str | None = None
    mode: str = "max"
    log_training_state: bool = False
    model_factory: str | None = None
    model_kwargs: dict[str, Any] | None = None
    max_queue: int = 2
    ema_ranks: str = "all"  # or "zero": under DDP only rank 0 keeps the EMA
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE
    sharded_save_dir: str | None = None  # sharded models: ranks write their parts, rank 0 merges
    silent: bool = False


@dataclasses.dataclass
class _Watched:
    """A model the session keeps an EMA of, and what drives it."""

    model: nn.Module
    ema: EMA
    optimizers: list[Any]
    schedulers: list[Any]
    name: str | None
    owner: str  # "autolog" (found by the hooks), "watch" or "lightning"
    run_tags: dict[str, str]
    epoch: int = 0
    steps: int = 0  # optimizer steps the hooks saw: when step checkpoints are due
    run_id: str | None = None  # the active run during its last step
    sharded: bool = False  # DTensor parameters (FSDP2): checkpoints gather, on every rank
    gathered_step: int | None = None  # a sharded model's last checkpointed step, on every rank

    @property
    def prefix(self) -> str:
        return f"{self.name}-" if self.name else ""


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"


def _rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _ema_here(config: AutologConfig) -> bool:
    """Does this rank keep an EMA? Every rank does, unless ``ema_ranks="zero"``."""
    return config.ema_ranks == "all" or _rank_zero()


def _active_run() -> tuple[str, str] | None:
    import mlflow

    run = mlflow.active_run()
    return (run.info.run_id, mlflow.get_tracking_uri()) if run else None


class _Session:
    """Everything autolog / watch installed, so that ``autolog(disable=True)`` removes it all."""

    def __init__(self) -> None:
        self.config = AutologConfig()
        self.autolog_on = False
        self.ledger = Ledger()
        self.uploader = Uploader(self.ledger)
        self.watched: list[_Watched] = []
        self.by_optimizer: weakref.WeakKeyDictionary[Any, _Watched | None] = weakref.WeakKeyDictionary()
        self._global_hooks: list[Any] = []
        self._patches: list[tuple[Any, str, Any]] = []
        self._prefix_threads: set[int] = set()
        self.ema_keys: set[str] = set()  # names only ever measured on EMA weights (Lightning validation)
        self._warned: set[str] = set()
        self.train_steps = 0  # optimizer steps of watched models: which weights a metric saw
        self._later: list[tuple[_Watched, Later]] = []  # scheduler states still to take

    # -- messages ---------------------------------------------------------------------

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and not self.config.silent:
            self._warned.add(key)
            warnings.warn(f"mlflow-ema: {message}", stacklevel=3)

    # -- install / remove ---------------------------------------------------------------

    def patch(self, owner: Any, name: str, replacement: Any) -> None:
        self._patches.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, replacement)

    def install_common(self) -> None:
        """The hooks both autolog and watch need: metric observation and run end."""
        if any(name == "set_terminated" for _, name, _ in self._patches):
            return
        from mlflow import MlflowClient

        self.patch(MlflowClient, "log_metric", _metric_patch(self, MlflowClient.log_metric))
        self.patch(MlflowClient, "log_batch", _batch_patch(self, MlflowClient.log_batch))
        self.patch(MlflowClient, "set_terminated", _run_end_patch(self, MlflowClient.set_terminated))

    def install_autolog(self) -> None:
        if self._global_hooks:
            return
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        self._global_hooks = [
            register_optimizer_step_pre_hook(BOUNDARY.hook(PRE_STEP, self.before_step)),
            register_optimizer_step_post_hook(BOUNDARY.hook(POST_STEP, self.after_step)),
        ]
        self.install_epoch_detection()

    def install_epoch_detection(self) -> None:
        from torch.utils.data.dataloader import _BaseDataLoaderIter

        original = _BaseDataLoaderIter.__next__
        session, off = self, BOUNDARY.off

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

        self.patch(_BaseDataLoaderIter, "__next__", patched_next)

    def reset(self) -> None:
        """Back to a fresh session (tests, and a process that runs several jobs)."""
        self.uploader.close()
        self.uninstall()
        BOUNDARY.reset()
        self.__init__()

    def uninstall(self) -> None:
        for hook in self._global_hooks:
            hook.remove()
        self._global_hooks = []
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches = []
        for w in self.watched:
            for opt in w.optimizers:
                for handle in getattr(opt, "_mlflow_ema_handles", ()):
                    handle.remove()
        self.watched = []
        self.by_optimizer = weakref.WeakKeyDictionary()
        self.autolog_on = False

    # -- metrics ----------------------------------------------------------------------------

    def on_upload_thread(self) -> bool:
        """The upload thread's own MLflow calls are not renamed nor observed."""
        return threading.current_thread() is self.uploader._thread

    @contextlib.contextmanager
    def prefix_metrics(self) -> Iterator[None]:
        """Metrics logged to MLflow from this thread get the ``ema/`` prefix meanwhile."""
        ident = threading.get_ident()
        self._prefix_threads.add(ident)
        try:
            yield
        finally:
            self._prefix_threads.discard(ident)

    def prefixed(self, key: str) -> str:
        if key.startswith(EMA_PREFIX) or key in _COUNTERS:
            return key
        if key in self.ema_keys or threading.get_ident() in self._prefix_threads:
            return EMA_PREFIX + key
        return key

    def observe(self, run_id: str, metrics: Sequence[tuple[str, float, int, int]], client: Any) -> None:
        if not metrics or not _rank_zero():
            return
        claimed = False
        for key, value, step, timestamp in metrics:
            claimed |= self.ledger.observe_metric(run_id, key, value, step, timestamp, self.train_steps)
        if claimed:
            self.uploader.request_sync(self.job_for(run_id, client.tracking_uri))

    def job_for(self, run_id: str, tracking_uri: str, parts: list | None = None) -> UploadJob:
        c = self.config
        return UploadJob(
            run_id, tracking_uri, parts or [], keep_top_k=c.keep_top_k, monitor=c.monitor, mode=c.mode
        )

    # -- finding models ----------------------------------------------------------------------

    def before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if optimizer not in self.by_optimizer:
            self.by_optimizer[optimizer] = self.resolve(optimizer)
        elif self._later:
            self.settle(self.by_optimizer[optimizer])

    def settle(self, w: _Watched | None = None) -> None:
        """Take the scheduler states that checkpoints of ``w`` (default: all) wait for."""
        waiting, self._later, error = self._later, [], None
        for owner, later in waiting:
            if w is None or owner is w:
                states = []
                try:
                    states = [s.state_dict() for s in owner.schedulers]
                except Exception as e:
                    error = error or e
                later.take(states)  # each one, whatever failed: the upload thread waits for it
            else:
                self._later.append((owner, later))
        if error is not None:
            raise error

    def after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        w = self.by_optimizer.get(optimizer)
        # watch() hooks its optimizer itself; Lightning's callback steps its own EMA.
        if w is not None and w.owner == "autolog" and w.optimizers[0] is optimizer:
            self.step(w)

    def resolve(self, optimizer: Any) -> _Watched | None:
        if not _ema_here(self.config):
            return None
        for w in self.watched:
            if any(o is optimizer for o in w.optimizers):
                return w
        live = _live((nn.Module, *_SCHEDULER_TYPES))  # one scan of the heap per new optimizer
        model = find_model(optimizer, live)
        if model is None:
            self.warn_once(
                f"resolve-{id(optimizer)}",
                f"cannot tell which model {type(optimizer).__name__} trains (no single module owns "
                "all its parameters); call mlflow_ema.watch(model, optimizer)",
            )
            return None
        for w in self.watched:
            if w.model is model:  # another optimizer of a watched model: the first one drives
                w.optimizers.append(optimizer)
                return w
        if _rank_zero() and _active_run() is None:
            self.warn_once("no-run", NO_RUN_MESSAGE)
        return self.add(model, [optimizer], owner="autolog", schedulers=find_schedulers([optimizer], live))

    def add(
        self,
        model: nn.Module,
        optimizers: list[Any],
        *,
        owner: str,
        ema: EMA | None = None,
        name: str | None = None,
        model_factory: str | None = None,
        model_kwargs: dict | None = None,
        schedulers: list[Any] | None = None,
    ) -> _Watched:
        c = self.config
        model = unwrap_model(model)
        sharded = is_sharded(model)
        if (
            sharded
            and c.sharded_save_dir
            and any(
                not placement.is_shard()
                for p in model.parameters()
                for placement in getattr(p, "placements", ())
            )
        ):
            raise MlflowEmaError(
                "sharded_save_dir needs parameters sharded across the ranks; replicated placements (HSDP) "
                "need the default gather (sharded_save_dir=None)"
            )
        if sharded and c.ema_ranks != "all":
            raise MlflowEmaError(
                "the model is sharded (DTensor parameters, e.g. FSDP2): every rank keeps the EMA of its "
                "own shards, so ema_ranks must be 'all'"
            )
        if ema is None:
            ema = EMA(
                model,
                decay=c.decay,
                update_every=c.update_every,
                start_step=c.start_step,
                dtype=c.ema_dtype,
                device=c.ema_device,
            )
        factory = model_factory or c.model_factory
        run_tags = {RUN_TAG_MODEL_CLASS: _class_path(model)}
        if factory:
            run_tags[RUN_TAG_MODEL_FACTORY] = factory
            run_tags[RUN_TAG_MODEL_KWARGS] = json.dumps(
                model_kwargs if model_kwargs is not None else c.model_kwargs or {}
            )
        if schedulers is None:
            schedulers = find_schedulers(optimizers) if optimizers else []
        w = _Watched(
            model, ema, list(optimizers), schedulers, name, owner, run_tags, steps=ema.step, sharded=sharded
        )
        self.watched.append(w)
        return w

    # -- per step -----------------------------------------------------------------------------

    def step(self, w: _Watched) -> None:
        """After an optimizer step of ``w``: the EMA update, then a step checkpoint when due.
        A sharded model's update belongs to its collective part, and its step checkpoints
        come on every rank alike whatever failed on one (the schedule counts steps itself)."""
        w.steps += 1
        if w.sharded:
            BOUNDARY.call(SHARDED, self.update, w)
        else:
            self.update(w)
        n = self.config.checkpoint_every_n_steps
        if n and w.steps % n == 0:
            self.checkpoint(w)

    def update(self, w: _Watched) -> None:
        w.ema.update()
        self.train_steps += 1
        run = _active_run()
        w.run_id = run[0] if run else None

    def on_epoch_end(self) -> None:
        n = self.config.checkpoint_every_n_epochs
        for w in self.watched:
            if w.owner == "lightning":
                continue
            w.epoch += 1
            if n and w.epoch % n == 0:
                self.checkpoint(w, epoch=w.epoch)

    def select(self, model: nn.Module | None) -> list[_Watched]:
        if not self.watched and not _ema_here(self.config):
            raise MlflowEmaError("this rank keeps no EMA (ema_ranks='zero'): use it on rank 0")
        if not self.watched:
            raise MlflowEmaError(
                "no model is watched: call mlflow_ema.autolog() and train, or mlflow_ema.watch(model, optimizer)"
            )
        if model is None:
            return list(self.watched)
        model = unwrap_model(model)
        chosen = [w for w in self.watched if w.model is model]
        if not chosen:
            raise MlflowEmaError(
                f"{type(model).__name__} is not watched: call mlflow_ema.watch(model, optimizer)"
            )
        return chosen

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint(
        self,
        w: _Watched,
        *,
        step: int | None = None,
        epoch: int | None = None,
        run: tuple[str, str] | None = None,
    ) -> bool:
        """Snapshot the raw and EMA weights and queue them for upload. False if skipped.

        A sharded model is gathered first, by every rank at once (a collective): that part
        decides alike on every rank, from the step alone, and fails alike on every rank
        (:func:`_sharded_states`). Only rank 0 writes."""
        step = w.ema.step if step is None else int(step)
        if not w.sharded:
            return self.queue(w, step, epoch, run, None)
        if run is not None:  # a run ending on rank 0 alone: the other ranks cannot join a gather
            if w.gathered_step != w.ema.step:
                self.warn_once(
                    f"sharded-end-{id(w)}",
                    "the model is sharded, so its checkpoints are gathered by every rank at once and "
                    "cannot be taken when the run ends on rank 0: the last "
                    f"{w.ema.step - (w.gathered_step or 0)} steps have no checkpoint (call "
                    "mlflow_ema.log_checkpoint() on every rank before the run ends, or use "
                    "checkpoint_every_n_epochs / checkpoint_every_n_steps)",
                )
            return False
        gathered = _sharded_states(w, step, self.config)
        if gathered is None or not _rank_zero():
            return False
        queued = BOUNDARY.call(SHARDED, self.queue, w, step, epoch, None, gathered)
        if queued is None:  # failed here: rank 0 says so at the next agreement
            _discard(gathered)
        return bool(queued)

    def queue(
        self, w: _Watched, step: int, epoch: int | None, run: tuple[str, str] | None, gathered: Any
    ) -> bool:
        """Rank 0: queue the checkpoint of ``step`` (``gathered``: a sharded model's full states)."""
        if not _rank_zero():
            return False
        run = run or _active_run()
        if run is None or self.ledger.has_checkpoint(run[0], step, w.prefix + "raw-"):
            if run is None:
                self.warn_once("no-run", NO_RUN_MESSAGE)
            _discard(gathered)
            return False
        run_id, tracking_uri = run
        epoch = (w.epoch or None) if epoch is None else int(epoch)
        training_state = None
        if self.config.log_training_state and w.sharded:
            self.warn_once(
                "sharded-training-state",
                "log_training_state is not supported for sharded models yet: checkpoints hold the weights only",
            )
        elif self.config.log_training_state:
            self.settle(w)  # states a broken pre-step hook left untaken: never keep the uploads waiting
            later = Later()
            self._later.append((w, later))
            training_state = take_snapshot(
                {**training_state_of(w, step=step, epoch=epoch), "schedulers": later}
            )
        parts = []
        states = gathered or (w.model.state_dict(), w.ema.model_state_dict())
        for kind, state in zip(("raw", "ema"), states, strict=True):
            name = f"{w.prefix}{kind}-step{step}"
            record = self.ledger.add_checkpoint(run_id, kind, step, epoch, name, self.train_steps)
            parts.append(
                CheckpointPart(
                    record,
                    # gathered: CPU copies already; merged parts: assembled on the upload thread
                    (state if isinstance(state, MergedParts) else Snapshot(state))
                    if gathered
                    else take_snapshot(state),
                    training_state=training_state if kind == "raw" else None,
                    ema_decay=w.ema.last_decay if kind == "ema" else None,
                    ema_updates=w.ema.num_updates if kind == "ema" else None,
                    init_fingerprint=w.ema.init_fingerprint,
                    tags={TAG_MODEL: w.name} if w.name else {},
                )
            )
        job = self.job_for(run_id, tracking_uri, parts)
        job.run_tags = w.run_tags
        self.uploader.submit(job)
        return True

    def on_run_end(self, run_id: str, status: str | None, tracking_uri: str) -> None:
        """Called before MLflow marks a run terminated: last checkpoint, then upload everything."""
        finished = status in (None, "FINISHED")
        for w in self.watched:
            if (
                w.run_id == run_id
                and finished
                and self.config.checkpoint_at_end
                and w.ema.step > 0
                and w.owner != "lightning"
            ):
                self.checkpoint(w, run=(run_id, tracking_uri))
        if not self.ledger.checkpoints(run_id) and not self.ledger.failures(run_id):
            return
        job = self.job_for(run_id, tracking_uri)
        self.settle()
        self.uploader.flush(run_id)
        if job.keep_top_k is not None and job.monitor:
            try:
                self.uploader.prune(job, final=True)
            except Exception as e:
                _logger.warning("mlflow-ema: pruning checkpoints of run %s failed: %s", run_id, e)
        self.report_failures(run_id, tracking_uri)
        self.ledger.forget(run_id)
        # A model found by autolog belongs to the run that trained it.
        self.watched = [w for w in self.watched if not (w.owner == "autolog" and w.run_id == run_id)]

    def report_failures(self, run_id: str, tracking_uri: str) -> None:
        failures = self.ledger.failures(run_id)
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


# -- checkpoints of sharded models: every rank at once, failing on every rank alike -------------


def _sharded_states(w: _Watched, step: int, config: AutologConfig) -> Any:
    """A sharded model's full raw and EMA states for rank 0 (the other ranks get empty dicts
    or None), taken by every rank at once: gathered over the process group, or written by
    every rank into ``sharded_save_dir`` and merged by rank 0 later. None: this step is taken
    already, or the part is off. Every rank runs its own work behind the boundary and the
    ranks agree (one ``all_reduce``) before the gather and after writing their parts, so a
    failure on one rank switches the part off on all of them: none waits for the others."""
    go, plan = BOUNDARY.prepare(SHARDED, _plan_sharded, w, step, config)
    if not go or plan is None:
        return None
    if plan == ():
        return BOUNDARY.call(SHARDED, gather_sharded, w.model, w.ema)
    wrote = BOUNDARY.call(SHARDED, _write_parts, w, plan)
    if not BOUNDARY.agree(SHARDED, wrote is not None):  # every part is written, or none is used
        if _rank_zero():
            _discard(plan)
        return None
    import torch.distributed as dist

    world = dist.get_world_size()
    return (MergedParts(plan[0], world), MergedParts(plan[1], world)) if _rank_zero() else None


def _plan_sharded(w: _Watched, step: int, config: AutologConfig) -> tuple[Path, ...] | None:
    """Local: None when ``step`` is taken already; ``()`` to gather; or the folders the ranks
    write their parts into (rank 0 clears what an interrupted job left there)."""
    if w.gathered_step == step:
        return None
    w.gathered_step = step
    if not config.sharded_save_dir:
        return ()
    folder = Path(config.sharded_save_dir)
    folders = (folder / f"{w.prefix}raw-step{step}", folder / f"{w.prefix}ema-step{step}")
    if _rank_zero():
        _discard(folders)
    return folders


def _write_parts(w: _Watched, folders: tuple[Path, ...]) -> bool:
    save_part(folders[0], w.model.state_dict())
    save_part(folders[1], w.ema.model_state_dict())
    return True


def _discard(states: Any) -> None:
    """Remove rank parts that will not be merged (folders, or :class:`MergedParts`)."""
    for item in states or ():
        if isinstance(item, MergedParts):
            item.discard()
        elif isinstance(item, Path):
            shutil.rmtree(item, ignore_errors=True)


# -- the patches, behind the safety boundary (mlflow_ema.safety) ---------------------------------


def _client_run(arguments: dict[str, Any]) -> tuple[str, str]:
    """The run a patched ``MlflowClient`` call writes to: tag it when mlflow-ema fails there."""
    return arguments["run_id"], arguments["self"].tracking_uri


def _metric_patch(session: _Session, log_metric: Any) -> Any:
    """``MlflowClient.log_metric``: the ``ema/`` prefix, a known timestamp, then the ledger."""
    signature = inspect.signature(log_metric)

    def prepare(args: tuple, kwargs: dict) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return None  # the caller's mistake: MLflow reports it
        bound.apply_defaults()
        a = bound.arguments
        a["key"] = session.prefixed(a["key"])
        a["timestamp"] = a["timestamp"] or int(time.time() * 1000)  # known, so links dedupe
        return bound

    def after(a: dict[str, Any]) -> None:
        session.observe(a["run_id"], [(a["key"], a["value"], a["step"] or 0, a["timestamp"])], a["self"])

    return BOUNDARY.patch(
        LOG_METRIC, log_metric, prepare, after, bypass=session.on_upload_thread, run_of=_client_run
    )


def _batch_patch(session: _Session, log_batch: Any) -> Any:
    """``MlflowClient.log_batch``: as :func:`_metric_patch`, for each metric."""
    signature = inspect.signature(log_batch)

    def prepare(args: tuple, kwargs: dict) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        a = bound.arguments
        a["metrics"] = [_renamed(m, session.prefixed(m.key)) for m in a["metrics"] or ()]
        return bound

    def after(a: dict[str, Any]) -> None:
        observed = [(m.key, m.value, m.step, m.timestamp) for m in a["metrics"] if m.model_id is None]
        session.observe(a["run_id"], observed, a["self"])

    return BOUNDARY.patch(
        LOG_BATCH, log_batch, prepare, after, bypass=session.on_upload_thread, run_of=_client_run
    )


def _run_end_patch(session: _Session, set_terminated: Any) -> Any:
    """``MlflowClient.set_terminated``: the last checkpoint and every upload first. MLflow's
    own ``set_terminated`` always runs, so a run never stays RUNNING because of mlflow-ema."""

    def patched_set_terminated(
        self_client: Any, run_id: str, status: str | None = None, end_time: int | None = None
    ) -> Any:
        try:
            BOUNDARY.call(
                RUN_END,
                _end_of_run,
                session,
                self_client,
                run_id,
                status,
                run=lambda: (run_id, self_client.tracking_uri),
            )
        finally:  # strict mode re-raises, after the run is marked terminated
            result = set_terminated(self_client, run_id, status, end_time)
        return result

    return patched_set_terminated


def _end_of_run(session: _Session, client: Any, run_id: str, status: str | None) -> None:
    session.on_run_end(run_id, status, client.tracking_uri)


def _iterator_started(session: _Session, iterator: Any) -> None:
    iterator._mlflow_ema_steps = session.train_steps


def _iterator_done(session: _Session, iterator: Any) -> None:
    """A DataLoader iterator is exhausted: an epoch ended if the optimizer stepped meanwhile."""
    started = getattr(iterator, "_mlflow_ema_steps", None)
    if started is not None and session.train_steps > started:
        iterator._mlflow_ema_steps = None
        session.on_epoch_end()


def _renamed(metric: Any, key: str) -> Any:
    from mlflow.entities import Metric

    if key == metric.key:
        return metric
    return Metric(
        key,
        metric.value,
        metric.timestamp,
        metric.step,
        dataset_name=metric.dataset_name,
        dataset_digest=metric.dataset_digest,
        model_id=metric.model_id,
        run_id=metric.run_id,
    )


def find_model(optimizer: Any, live: list[Any] | None = None) -> nn.Module | None:
    """The outermost live module owning every parameter ``optimizer`` updates, unwrapped;
    None when there is no such module or several unrelated ones."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not params:
        return None
    modules = [obj for obj in (live if live is not None else _live(nn.Module)) if isinstance(obj, nn.Module)]
    children = {id(child) for m in modules for child in m._modules.values() if child is not None}
    owners = {id(m) for m in modules if any(id(p) in params for p in m._parameters.values() if p is not None)}
    if not owners:
        return None
    roots = [m for m in modules if id(m) not in children and params <= {id(p) for p in m.parameters()}]
    unwrapped = {id(unwrap_model(m)): unwrap_model(m) for m in roots}
    return next(iter(unwrapped.values())) if len(unwrapped) == 1 else None


def find_schedulers(optimizers: Sequence[Any], live: list[Any] | None = None) -> list[Any]:
    """Learning-rate schedulers attached to ``optimizers``, so training state includes them."""
    ids = {id(o) for o in optimizers}
    candidates = live if live is not None else _live(_SCHEDULER_TYPES)
    return [
        s for s in candidates if isinstance(s, _SCHEDULER_TYPES) and id(getattr(s, "optimizer", None)) in ids
    ]


def _live(cls: type | tuple[type, ...]) -> list[Any]:
    """Live objects of a class. Once per optimizer, never per step."""
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        # weakref proxies (Lightning keeps one of its module) pass isinstance but are not modules
        return [
            obj
            for obj in gc.get_objects()
            if isinstance(obj, cls) and not isinstance(obj, weakref.ProxyTypes)
        ]


def training_state_of(w: _Watched, *, step: int, epoch: int | None) -> dict[str, Any]:
    """Optimizer, scheduler, EMA and RNG state: what a resumed run needs to continue bit for bit."""
    return {
        "version": 1,
        "step": step,
        "epoch": epoch,
        "optimizers": [o.state_dict() for o in w.optimizers],
        "ema": w.ema.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2],
        },
    }


_SESSION = _Session()


@BOUNDARY.guarded(EXIT_FLUSH)
def _flush_at_exit() -> None:
    # Runs still open are ended after this by MLflow's own exit handler, which reports.
    _SESSION.settle()
    if not _SESSION.uploader.flush(timeout=600):
        _logger.warning("mlflow-ema: checkpoints were still uploading at exit")


atexit.register(_flush_at_exit)


# -- the public API ---------------------------------------------------------------------------


def autolog(
    *,
    decay: float | DecaySchedule | None = None,
    update_every: int = 1,
    start_step: int = 0,
    ema_dtype: torch.dtype | None = None,
    ema_device: str | torch.device | None = None,
    checkpoint_every_n_steps: int | None = None,
    checkpoint_every_n_epochs: int | None = None,
    checkpoint_at_end: bool = True,
    keep_top_k: int | None = None,
    monitor: str | None = None,
    mode: str = "max",
    log_training_state: bool = False,
    model_factory: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    max_queue: int = 2,
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
    ema_ranks: str = "all",
    sharded_save_dir: str | None = None,
    disable: bool = False,
    silent: bool = False,
) -> None:
    """Keep an EMA of every model trained in this process and log raw and EMA checkpoints
    to the active MLflow run as LoggedModels.

    One line before a plain training loop is enough: the EMA is updated after every
    ``optimizer.step()`` and, by default, checkpoints are logged when the run ends.
    Calling it again replaces the configuration; ``autolog(disable=True)`` removes every
    hook and patch it installed.

    Args:
        decay: the EMA decay or schedule (default ``WarmupDecay(0.9999, power=3/4)``,
            which suits runs from a few hundred steps to ~100k).
        update_every, start_step, ema_dtype, ema_device: as for :class:`mlflow_ema.EMA`.
        checkpoint_every_n_steps: also checkpoint every N optimizer steps.
        checkpoint_every_n_epochs: also checkpoint every N epochs (an epoch ends when a
            ``DataLoader`` the optimizer stepped over is exhausted; Lightning: its epochs).
        checkpoint_at_end: checkpoint when the run ends successfully.
        keep_top_k: keep only the K best checkpoints by ``monitor`` (plus the last);
            raw and EMA checkpoints of one step are kept or deleted together.
        monitor, mode: the metric ``keep_top_k`` ranks by (e.g. ``"ema/val_acc"``), ``"max"``
            or ``"min"``.
        log_training_state: also record optimizer, scheduler, EMA and RNG state with each
            raw checkpoint, for :func:`resume`.
        model_factory, model_kwargs: ``"module:function"`` and its keyword arguments that
            rebuild the model; recorded on the run, so averaging needs no pickle.
        max_queue: checkpoints that may wait for upload before training waits.
        max_shard_size: weights above this size (bytes, or e.g. ``"5GB"``; ``None``: never)
            are written as safetensors shards with a Hugging Face index.
        ema_ranks: under ``torch.distributed``, ``"all"`` ranks keep the EMA (the default;
            required for sharded models, where each rank averages its own shards) or
            ``"zero"``: only rank 0 (DDP: saves the other ranks the memory and the work).
            Only rank 0 writes to MLflow either way.
        sharded_save_dir: for sharded (FSDP2) models: instead of gathering the full weights
            over the network at a checkpoint, every rank writes its own shards into this
            directory (which all ranks must see: a local disk on one node, else a shared
            filesystem) and rank 0 merges them into the checkpoint it uploads, on its upload
            thread. Default: gather to rank 0.
        disable: remove autolog's hooks.
        silent: no warnings about setup (never about lost checkpoints).
    """
    session = _SESSION
    if disable:
        session.uploader.flush(timeout=600)
        session.uninstall()
        return
    if keep_top_k is not None and (keep_top_k < 1 or not monitor):
        raise ValueError("keep_top_k needs an integer >= 1 and a metric to monitor")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if ema_ranks not in ("all", "zero"):
        raise ValueError(f"ema_ranks must be 'all' or 'zero', got {ema_ranks!r}")
    for name, value in (
        ("checkpoint_every_n_steps", checkpoint_every_n_steps),
        ("checkpoint_every_n_epochs", checkpoint_every_n_epochs),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    defaults = AutologConfig()
    session.config = AutologConfig(
        decay=defaults.decay if decay is None else decay,
        update_every=update_every,
        start_step=start_step,
        ema_dtype=ema_dtype,
        ema_device=ema_device,
        checkpoint_every_n_steps=checkpoint_every_n_steps,
        checkpoint_every_n_epochs=checkpoint_every_n_epochs,
        checkpoint_at_end=checkpoint_at_end,
        keep_top_k=keep_top_k,
        monitor=monitor,
        mode=mode,
        log_training_state=log_training_state,
        model_factory=model_factory,
        model_kwargs=model_kwargs,
        max_queue=max_queue,
        max_shard_size=parse_size(max_shard_size),
        ema_ranks=ema_ranks,
        sharded_save_dir=str(sharded_save_dir) if sharded_save_dir else None,
        silent=silent,
    )
    session.uploader.max_queue = max_queue
    session.uploader.max_shard_size = session.config.max_shard_size
    session.install_common()
    session.install_autolog()
    session.autolog_on = True


def watch(
    model: nn.Module,
    optimizer: Any | Sequence[Any] | None = None,
    *,
    ema: EMA | None = None,
    name: str | None = None,
    model_factory: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> EMA:
    """Keep an EMA of ``model``, updated after each ``optimizer.step()``, and log its
    checkpoints like autolog does (with autolog's configuration, or its defaults).

    The explicit API: no search for the model. Without ``optimizer``, call
    ``ema.update()`` yourself. Pass ``ema=`` to use an EMA you built; ``name`` tells
    several watched models apart (checkpoint names and the tag ``mlflow_ema.model``).
    Returns the EMA.
    """
    session = _SESSION
    optimizers = (
        [] if optimizer is None else list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    )
    target = unwrap_model(model)
    for w in session.watched:
        if w.model is target:
            raise MlflowEmaError(f"{type(target).__name__} is already watched")
    session.install_common()
    w = session.add(
        model,
        optimizers,
        owner="watch",
        ema=ema,
        name=name,
        model_factory=model_factory,
        model_kwargs=model_kwargs,
    )
    for opt in optimizers:
        session.by_optimizer[opt] = w
    if optimizers:  # the first optimizer's steps drive the EMA
        opt = optimizers[0]

        def before(*_: Any) -> None:
            if session._later:
                session.settle(w)

        handles = [
            opt.register_step_pre_hook(BOUNDARY.hook(WATCH, before)),
            opt.register_step_post_hook(BOUNDARY.hook(WATCH, lambda *_: session.step(w))),
        ]
        opt._mlflow_ema_handles = [*getattr(opt, "_mlflow_ema_handles", ()), *handles]
    return w.ema


def log_checkpoint(
    *,
    step: int | None = None,
    epoch: int | None = None,
    metrics: dict[str, float] | None = None,
    model: nn.Module | None = None,
) -> None:
    """Log raw and EMA checkpoints of the watched model(s) now, to the active run.

    ``metrics`` are logged to the run at ``step`` (default: the EMA's step count) and
    linked to the checkpoints: names starting with ``ema/`` to the EMA checkpoint, the
    others to the raw one. Safe to call on every rank: only rank 0 writes. For a sharded
    (FSDP2) model call it on every rank: the weights are gathered to rank 0 first.
    """
    session = _SESSION
    if not session.watched and not _rank_zero():
        return  # ema_ranks="zero", or a model watched on rank 0 only: nothing to do here
    targets = session.select(model)
    if metrics and _rank_zero():
        import mlflow

        if mlflow.active_run() is not None:
            log_step = targets[0].ema.step if step is None else int(step)
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=log_step)
    for w in targets:
        session.checkpoint(w, step=step, epoch=epoch)


@contextlib.contextmanager
def swap(model: nn.Module | None = None) -> Iterator[None]:
    """Evaluate with the EMA weights: the watched model(s) hold them inside the block,
    and metrics logged to MLflow from this thread meanwhile get the ``ema/`` prefix
    (``val_acc`` -> ``ema/val_acc``), so they link to the EMA checkpoint of their step."""
    session = _SESSION
    with contextlib.ExitStack() as stack:
        for w in session.select(model):
            stack.enter_context(w.ema.swap())
        stack.enter_context(session.prefix_metrics())
        yield


def get_ema(model: nn.Module | None = None) -> EMA:
    """The EMA autolog or watch keeps for ``model`` (default: the only watched model)."""
    targets = _SESSION.select(model)
    if len(targets) > 1:
        raise MlflowEmaError("several models are watched: pass the model")
    return targets[0].ema


def flush(timeout: float | None = None) -> bool:
    """Wait until every queued checkpoint is uploaded (or given up on); False on timeout."""
    _SESSION.settle()
    return _SESSION.uploader.flush(timeout=timeout)


@dataclasses.dataclass(frozen=True)
class ResumeInfo:
    step: int
    epoch: int | None
    run_id: str | None
    model_id: str | None


def resume(
    model: nn.Module,
    optimizer: Any | Sequence[Any] | None = None,
    scheduler: Any | Sequence[Any] | None = None,
    *,
    run_id: str | None = None,
    checkpoint: str | Path | None = None,
) -> ResumeInfo:
    """Restore the weights, optimizer, scheduler, EMA and RNG state from the latest raw
    checkpoint logged with ``log_training_state=True``, and watch the model so training
    continues where it stopped. Resume inside ``mlflow.start_run(run_id=...)`` to keep
    logging into the same run.

    ``run_id`` defaults to the active run; ``checkpoint`` is a local checkpoint folder
    to use instead. Returns the step and epoch to continue from.
    """
    from mlflow_ema.checkpoint import load_checkpoint, load_training_state

    optimizers = (
        [] if optimizer is None else list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    )
    schedulers = (
        [] if scheduler is None else list(scheduler) if isinstance(scheduler, (list, tuple)) else [scheduler]
    )
    model_id = None
    with tempfile.TemporaryDirectory(prefix="mlflow-ema-resume-") as tmp:
        if checkpoint is None:
            checkpoint, model_id, run_id = _download_latest_training_state(run_id, Path(tmp))
        state_dict, _manifest = load_checkpoint(checkpoint)
        state = load_training_state(checkpoint)
    target = unwrap_model(model)
    try:
        target.load_state_dict(state_dict)
    except RuntimeError as e:
        raise IncompatibleModelError(
            f"checkpoint does not fit {type(target).__name__}: {str(e).splitlines()[0]}"
        ) from None
    if len(state["optimizers"]) != len(optimizers) or len(state["schedulers"]) < len(schedulers):
        raise IncompatibleModelError(
            f"checkpoint holds {len(state['optimizers'])} optimizer and {len(state['schedulers'])} "
            f"scheduler states; {len(optimizers)} and {len(schedulers)} were passed"
        )
    for opt, opt_state in zip(optimizers, state["optimizers"], strict=False):
        opt.load_state_dict(opt_state)
    for sched, sched_state in zip(schedulers, state["schedulers"], strict=False):
        sched.load_state_dict(sched_state)
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    session = _SESSION
    existing = [w for w in session.watched if w.model is target]
    if existing:
        w = existing[0]
    else:
        watch(model, optimizers or None)
        w = session.watched[-1]
    w.ema.load_state_dict(state["ema"])
    w.steps = w.ema.step
    w.schedulers = schedulers or w.schedulers
    w.epoch = state["epoch"] or 0
    return ResumeInfo(step=int(state["step"]), epoch=state["epoch"], run_id=run_id, model_id=model_id)


def _download_latest_training_state(run_id: str | None, tmp: Path) -> tuple[Path, str, str]:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    if run_id is None:
        run = mlflow.active_run()
        if run is None:
            raise MlflowEmaError("resume() needs run_id=, a checkpoint= folder, or an active run")
        run_id = run.info.run_id
    client = MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=(
            f"source_run_id = '{run_id}' AND tags.`{TAG_KIND}` = 'raw' AND tags.`{TAG_TRAINING_STATE}` = 'true'"
        ),
    )
    models = [m for m in models if m.status == LoggedModelStatus.READY]  # never a half-uploaded one
    if not models:
        raise CheckpointError(
            f"run {run_id} has no complete checkpoint with training state "
            "(log them with autolog(log_training_state=True))"
        )
    latest = max(models, key=lambda m: int(m.tags.get(TAG_STEP, -1)))
    local = mlflow.artifacts.download_artifacts(artifact_uri=latest.artifact_location, dst_path=str(tmp))
    return Path(local), latest.model_id, run_id
