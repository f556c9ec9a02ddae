"""The session: what autolog, watch and the Lightning callback keep, one per process.

The data path, per optimizer step of a watched model:
``patches`` (torch hook) -> :meth:`Session.after_optimizer_step` -> ``ema.update()`` and,
when due, :class:`mlflow_ema.checkpointing.Checkpoints` -> snapshot -> upload thread
(:mod:`mlflow_ema.uploader`) -> checkpoint files -> LoggedModel. Metrics logged meanwhile go
through :mod:`mlflow_ema.routing` (the ``ema/`` prefix) to the ledger, which links them to
checkpoints. At the run's end, :mod:`mlflow_ema.run_end`.

The calls the Lightning callback uses are marked "Lightning" below and listed in
:data:`LIGHTNING_API`; it uses nothing else (``tests/test_code_size.py`` checks).
"""

from __future__ import annotations

import json
import threading
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

from torch import nn

from mlflow_ema.capture import start_capture, stop_capture
from mlflow_ema.checkpointing import NO_RUN_MESSAGE, Checkpoints, active_run, rank_zero
from mlflow_ema.discovery import find_model, find_schedulers, held_objects
from mlflow_ema.ema import EMA, is_sharded, unwrap_model
from mlflow_ema.errors import MlflowEmaError
from mlflow_ema.ledger import Ledger
from mlflow_ema.options import AutologConfig
from mlflow_ema.patches import Patches
from mlflow_ema.posthoc_emas import PosthocEMAs
from mlflow_ema.routing import MetricRouter
from mlflow_ema.safety import BOUNDARY, SHARDED
from mlflow_ema.tags import RUN_TAG_MODEL_CLASS, RUN_TAG_MODEL_FACTORY, RUN_TAG_MODEL_KWARGS
from mlflow_ema.uploader import Uploader, UploadJob
from mlflow_ema.watched import Driver, Watched

# What mlflow_ema.lightning may use of the session: the methods marked "Lightning", and the
# documented parts (``config``, ``autolog_on``, ``routing``'s ema/ calls, ``checkpoints.take``).
LIGHTNING_API = frozenset({
    "install_run_hooks", "add", "bind_optimizers", "remove", "before_own_step", "update_emas", "flush",
    "posthoc_snapshot_if_due", "config", "autolog_on", "routing.ema_weights_in", "routing.remember_ema_keys",
    "routing.forget_ema_keys", "checkpoints.take", "checkpoints.take_posthoc",
})  # fmt: skip


class Session:
    """Everything autolog / watch installed and keeps, so that ``autolog(disable=True)``
    removes it all. ``optimizer_steps`` counts the steps of every watched model together:
    a metric logged after N of them describes the weights of that moment (the ledger)."""

    def __init__(self) -> None:
        self.config = AutologConfig()
        self.autolog_on = False
        self.ledger = Ledger()
        self.uploader = Uploader(self.ledger)
        self.routing = MetricRouter()
        self.patches = Patches(self)
        self.checkpoints = Checkpoints(self)
        self.watched: list[Watched] = []
        self.by_optimizer: weakref.WeakKeyDictionary[Any, Watched | None] = weakref.WeakKeyDictionary()
        self.optimizer_steps = 0
        self._warned: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and not self.config.silent:
            self._warned.add(key)
            warnings.warn(f"mlflow-ema: {message}", stacklevel=3)

    def reset(self) -> None:
        """Back to a fresh session (tests, and a process that runs several jobs)."""
        self.uploader.close()
        self.uninstall()
        BOUNDARY.reset()
        self.__init__()

    def uninstall(self) -> None:
        self.patches.uninstall()
        for w in self.watched:
            stop_capture(w)
        self.watched = []
        self.by_optimizer = weakref.WeakKeyDictionary()
        self.autolog_on = False

    def install_run_hooks(self) -> None:
        """Lightning: the MLflow patches (metric routing, the run's end)."""
        self.patches.install_run_hooks()

    # -- metrics --------------------------------------------------------------------------------

    def on_upload_thread(self) -> bool:
        """The upload thread's own MLflow calls are not renamed nor observed."""
        return threading.current_thread() is self.uploader._thread

    def observe(self, run_id: str, metrics: Sequence[tuple[str, float, int, int]], client: Any) -> None:
        """Metrics just logged to ``run_id``: the ledger links them to their checkpoints."""
        if not metrics or not rank_zero():
            return
        claimed = False
        for key, value, step, timestamp in metrics:
            claimed |= self.ledger.observe_metric(run_id, key, value, step, timestamp, self.optimizer_steps)
        if claimed:
            self.uploader.request_sync(self.upload_job(run_id, client.tracking_uri))

    def upload_job(self, run_id: str, tracking_uri: str, parts: list | None = None) -> UploadJob:
        c = self.config
        return UploadJob(
            run_id, tracking_uri, parts or [], keep_top_k=c.keep_top_k, monitor=c.monitor, mode=c.mode
        )

    # -- optimizer steps --------------------------------------------------------------------------

    def before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """torch's global pre-step hook: find the model at an optimizer's first step."""
        if optimizer not in self.by_optimizer:
            self.by_optimizer[optimizer] = self.resolve(optimizer)
        elif (w := self.by_optimizer[optimizer]) is not None:
            self.before_own_step(w)

    def before_own_step(self, w: Watched) -> None:
        """Lightning: a step of ``w`` begins: its checkpoints' training state is complete."""
        if self.checkpoints.pending:
            self.checkpoints.complete(w)

    def after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """torch's global post-step hook. watch() hooks its optimizer itself; Lightning's
        callback steps its own EMA; several optimizers of one model: the first one drives."""
        w = self.by_optimizer.get(optimizer)
        if w is not None and w.driver == "autolog" and w.optimizers[0] is optimizer:
            self.after_optimizer_step(w)

    def after_optimizer_step(self, w: Watched) -> None:
        """The EMA update, then a step checkpoint when due. A sharded model's update belongs
        to its collective part, and its step checkpoints come on every rank alike whatever
        failed on one (``optimizer_steps`` counts on its own)."""
        w.optimizer_steps += 1
        if w.sharded:
            BOUNDARY.call(SHARDED, self._update, w)
        else:
            self._update(w)
        n = self.config.checkpoint_every_n_steps
        if n and w.optimizer_steps % n == 0:
            self.checkpoints.take(w)
        self.posthoc_snapshot_if_due(w)

    def _update(self, w: Watched) -> None:
        self.update_emas(w, active_run())

    def update_emas(self, w: Watched, run: tuple[str, str] | None) -> None:
        """Lightning: ``w`` took an optimizer step in ``run``: its EMA and post-hoc EMAs follow."""
        w.ema.update()
        if w.posthoc is not None:
            w.posthoc.update()
        self.optimizer_steps += 1
        w.run_id = run[0] if run else None

    def posthoc_snapshot_if_due(self, w: Watched, run: tuple[str, str] | None = None) -> None:
        """Lightning: snapshot ``w``'s post-hoc EMAs every ``posthoc_every_n_steps`` (the same
        step on every rank)."""
        if w.posthoc is not None and w.posthoc.due():
            self.checkpoints.take_posthoc(w, run=run)

    def on_epoch_end(self) -> None:
        n = self.config.checkpoint_every_n_epochs
        for w in self.watched:
            if w.driver == "lightning":
                continue
            w.epochs += 1
            if n and w.epochs % n == 0:
                self.checkpoints.take(w, epoch=w.epochs)

    # -- watched models -------------------------------------------------------------------------

    def keeps_ema(self) -> bool:
        """Does this rank keep an EMA? Every rank does, unless ``ema_ranks="zero"``."""
        return self.config.ema_ranks == "all" or rank_zero()

    def resolve(self, optimizer: Any) -> Watched | None:
        """The watched model ``optimizer`` trains, found among the live modules (once)."""
        if not self.keeps_ema():
            return None
        for w in self.watched:
            if any(o is optimizer for o in w.optimizers):
                return w
        held = held_objects()  # what the code stepping the optimizer holds: its model, schedulers
        entry = find_model(optimizer, held)  # what the loop calls: the model, or its wrapper
        model = unwrap_model(entry) if entry is not None else None
        if model is None:
            self.warn_once(
                f"resolve-{id(optimizer)}",
                f"cannot tell which model {type(optimizer).__name__} trains (none of the modules the code "
                "stepping it holds owns all its parameters, or several unrelated ones do); call "
                "mlflow_ema.watch(model, optimizer)",
            )
            return None
        for w in self.watched:
            if w.model is model:  # another optimizer of a watched model: the first one drives
                w.optimizers.append(optimizer)
                self.warn_once(
                    f"shared-{id(w)}",
                    f"one module, {type(model).__name__}, holds the parameters of several optimizers "
                    f"({', '.join(type(o).__name__ for o in w.optimizers)}): one EMA covers them all, updated at "
                    "the first one's steps. If they train separate models (a GAN's generator and discriminator), "
                    "keep those as separate modules in your loop, or call mlflow_ema.watch(model, optimizer) for each",
                )
                return w
        if rank_zero() and active_run() is None:
            self.warn_once("no-run", NO_RUN_MESSAGE)
        return self.add(entry, [optimizer], driver="autolog", schedulers=find_schedulers([optimizer], held),
                        posthoc=self.config.build_posthoc(model))  # fmt: skip

    def add(self, model: nn.Module, optimizers: list[Any], *, driver: Driver, ema: EMA | None = None,
            name: str | None = None, model_factory: str | None = None, model_kwargs: dict | None = None,
            schedulers: list[Any] | None = None, posthoc: PosthocEMAs | None = None) -> Watched:  # fmt: skip
        """Lightning: keep an EMA of ``model`` (``ema``, or one made with the configuration),
        and its post-hoc EMAs if any. ``model`` may be the wrapper the loop calls (DDP,
        ``torch.compile``): the EMA is of the model inside, and the architecture's inputs are
        read from the wrapper's calls."""
        entry, model = model, unwrap_model(model)
        sharded = is_sharded(model)
        if sharded:
            _check_sharded(model, self.config)
        ema = ema if ema is not None else self.config.build(model)
        run_tags = _run_tags(model, model_factory or self.config.model_factory,
                             model_kwargs if model_kwargs is not None else self.config.model_kwargs)  # fmt: skip
        if schedulers is None:  # watch(): those the caller holds already (resume() passes its own)
            schedulers = find_schedulers(optimizers, held_objects()) if optimizers else []
        w = Watched(model, ema, list(optimizers), schedulers, name, driver, run_tags,
                    optimizer_steps=ema.step, sharded=sharded, entry=entry, index=len(self.watched),
                    posthoc=posthoc)  # fmt: skip
        self.watched.append(w)
        start_capture(w, self)
        return w

    def bind_optimizers(self, w: Watched, optimizers: list[Any], schedulers: list[Any]) -> None:
        """Lightning: ``w`` is trained by these (its EMA is stepped by the caller)."""
        w.optimizers, w.schedulers = list(optimizers), list(schedulers)
        for optimizer in optimizers:
            self.by_optimizer[optimizer] = w

    def remove(self, w: Watched) -> None:
        """Lightning: stop watching ``w``."""
        if w in self.watched:
            self.watched.remove(w)
        stop_capture(w)

    def name_models(self, run_id: str) -> None:
        """Name the models that train in run ``run_id`` (in the order their optimizers first
        stepped): ``watch(name=...)``, else the class name in lower case, ``-2``... for a
        second of one class. With several, checkpoint names start with the name."""
        in_run = [w for w in self.watched if w.run_id in (run_id, None)]  # None: not stepped yet
        counts: dict[str, int] = {}
        for w in in_run:
            base = w.name or type(w.model).__name__.lower()
            counts[base] = counts.get(base, 0) + 1
            w.label = base if counts[base] == 1 else f"{base}-{counts[base]}"
            w.several = len(in_run) > 1

    def select(self, model: nn.Module | None) -> list[Watched]:
        """The watched model(s) an API call is about: ``model``'s, or all of them."""
        if not self.watched and not self.keeps_ema():
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

    def flush(self, run_id: str | None = None, timeout: float | None = None) -> bool:
        """Lightning: queue the checkpoints waiting for a training state, then wait for the
        uploads (of ``run_id``, or all); False on timeout."""
        self.checkpoints.complete(run_id=run_id)
        return self.uploader.flush(run_id, timeout=timeout)


def _check_sharded(model: nn.Module, config: AutologConfig) -> None:
    if config.sharded_save_dir and any(
        not placement.is_shard() for p in model.parameters() for placement in getattr(p, "placements", ())
    ):
        raise MlflowEmaError(
            "sharded_save_dir needs parameters sharded across the ranks; replicated placements (HSDP) "
            "need the default gather (sharded_save_dir=None)"
        )
    if config.ema_ranks != "all":
        raise MlflowEmaError(
            "the model is sharded (DTensor parameters, e.g. FSDP2): every rank keeps the EMA of its "
            "own shards, so ema_ranks must be 'all'"
        )


def _run_tags(model: nn.Module, factory: str | None, kwargs: dict | None) -> dict[str, str]:
    """What the run records to rebuild the model (see :mod:`mlflow_ema.architecture`)."""
    tags = {RUN_TAG_MODEL_CLASS: f"{type(model).__module__}:{type(model).__qualname__}"}
    if factory:
        tags[RUN_TAG_MODEL_FACTORY] = factory
        tags[RUN_TAG_MODEL_KWARGS] = json.dumps(kwargs or {})
    return tags


SESSION = Session()
