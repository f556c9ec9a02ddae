"""A Lightning callback that keeps an EMA of the LightningModule and logs raw and EMA
checkpoints to MLflow (install the ``lightning`` extra).

::

    trainer = lightning.pytorch.Trainer(callbacks=[EMACallback(decay=0.999)], logger=MLFlowLogger(...))

What it does, and where things go:

- after every optimizer step (``trainer.global_step`` advanced), ``ema.update()``;
- validation runs twice (``validate_raw=True``, the default): Lightning's own pass with
  the raw weights logs ``val_acc``, then the callback runs the validation loop again
  with the EMA weights swapped in, and what it logs reaches MLflow as ``ema/val_acc``.
  During that second pass the other callbacks are hidden (``ModelCheckpoint`` never saves
  EMA weights as the model's, ``EarlyStopping`` counts one validation per epoch); after
  it ``callback_metrics`` hold both ``val_acc`` (raw) and ``ema/val_acc`` (EMA), so
  monitors may watch either (the callback moves itself first in the Trainer's list so
  that the ``ema/`` values are there before the others' ``on_validation_end``). The raw
  weights are back when validation ends, also when it fails;
- ``validate_raw=False``: one pass, with the EMA weights (half the cost). Lightning's
  ``callback_metrics`` keep their names (``val_acc``, the EMA's value); what reaches
  MLflow is prefixed ``ema/``, also when ``mlflow.pytorch.autolog()`` logs
  ``callback_metrics`` at epoch end;
- with no ``MLFlowLogger`` and no ``mlflow.pytorch.autolog()`` (e.g. ``mlflow_ema.autolog()``
  with ``logger=False`` inside ``mlflow.start_run()``), the callback itself logs what the
  LightningModule logged to the active run: validation metrics after each pass,
  ``callback_metrics`` of training at each epoch end (step ``trainer.global_step``); so
  the checkpoints still get their metrics;
- raw and EMA checkpoints become MLflow LoggedModels of the run: the MLFlowLogger's
  run, else the active run (e.g. the one ``mlflow.pytorch.autolog()`` starts), every
  ``checkpoint_every_n_epochs`` after validation and at the end of ``fit``; all are
  uploaded before ``fit`` returns;
- the LightningModule's class path and ``hparams`` are recorded on the run, so the
  model can be rebuilt without pickle;
- Lightning's own ``.ckpt`` files carry the EMA state (``state_dict`` of this
  callback), so ``trainer.fit(ckpt_path=...)`` resumes it.

``mlflow_ema.autolog()`` adds this callback to every Trainer created afterwards
(through Lightning's ``lightning.pytorch.callbacks_factory`` entry point) unless the
Trainer already has one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from typing import Any

import lightning.pytorch as pl

from mlflow_ema.checkpointing import active_run
from mlflow_ema.ema import EMA
from mlflow_ema.ledger import EMA_PREFIX
from mlflow_ema.options import EMAOptions, signature_of
from mlflow_ema.posthoc_emas import PosthocEMAs
from mlflow_ema.safety import BOUNDARY, LIGHTNING, LIGHTNING_ENTRY
from mlflow_ema.session import SESSION
from mlflow_ema.tags import RUN_TAG_MODEL_HPARAMS
from mlflow_ema.watched import Watched


def _run_in(*args: Any, **kwargs: Any) -> tuple[str, str] | None:
    """The run of the Trainer among a hook's arguments: where an error of the callback is recorded."""
    for arg in args:
        if isinstance(arg, pl.Trainer):
            return _run_of(arg)
    return None


# Every hook of the callback runs behind the safety boundary (mlflow_ema.safety): an error of
# its own gives the model its raw weights back and switches the callback off; training goes on.
_hook = BOUNDARY.guarded(LIGHTNING, on_error=lambda self, *_, **__: self._detach(), run_of=_run_in)
_cleanup = BOUNDARY.guarded(LIGHTNING, always=True, run_of=_run_in)  # runs even when off


class EMACallback(pl.Callback):
    """Keep an EMA of the LightningModule, validate with it, log raw and EMA checkpoints.

    Args:
        decay, update_every, start_step, ema_dtype, ema_device: the EMA's options
            (:class:`mlflow_ema.options.EMAOptions`, as for :class:`mlflow_ema.EMA`; ``decay``
            defaults to autolog's, else ``WarmupDecay(0.9999, power=3/4)``).
        posthoc_every_n_steps, posthoc_sigma_rels: post-hoc EMA, as for ``autolog``
            (snapshots every N optimizer steps and at the end of ``fit``).
        validate_with_ema: validate the EMA weights (metrics logged as ``ema/<name>``).
        validate_raw: validate the raw weights too (Lightning's pass, plain names), then the
            EMA ones in a second pass: both raw and EMA checkpoints get metrics to rank by.
            False: only the EMA pass (half the validation time; raw checkpoints get none).
        checkpoint_every_n_epochs: checkpoint after every N-th validation (None: only at the end).
        checkpoint_at_end: checkpoint when ``fit`` ends.

    State kept here: ``ema`` (the EMA; in Lightning's ``.ckpt`` through :meth:`state_dict`,
    with ``posthoc``, the post-hoc EMAs),
    ``_last_global_step`` (``trainer.global_step`` at the EMA's last update: a batch that
    did not advance it, under gradient accumulation, does not update the EMA).
    """

    def __init__(
        self,
        *,
        validate_with_ema: bool = True,
        validate_raw: bool = True,
        checkpoint_every_n_epochs: int | None = None,
        checkpoint_at_end: bool = True,
        **ema_options: Any,
    ) -> None:
        if ema_options.get("decay") is None:
            ema_options["decay"] = SESSION.config.decay
        self.ema_options = EMAOptions(**ema_options)
        self.validate_with_ema = validate_with_ema
        self.validate_raw = validate_raw
        self.checkpoint_every_n_epochs = checkpoint_every_n_epochs
        self.checkpoint_at_end = checkpoint_at_end
        self.ema: EMA | None = None
        self.posthoc: PosthocEMAs | None = None  # the power-function EMAs (posthoc_every_n_steps)
        self._ema_of: pl.LightningModule | None = None  # the module self.ema follows
        self._auto = False  # added by autolog's entry point
        self._watched: Watched | None = None
        self._last_global_step = 0
        self._swap: contextlib.ExitStack | None = None
        self._restored: dict[str, Any] | None = None
        self._in_ema_pass = False  # the callback's own validation pass with the EMA weights
        self._ema_names: set[str] = set()  # what that pass logged
        self._val_names: set[str] = set()  # what validation logged (what training did: the rest)
        self._mirror = False  # no MLFlowLogger, no mlflow.pytorch.autolog: log metrics ourselves

    # -- lifecycle ------------------------------------------------------------------------

    def _active(self, trainer: pl.Trainer) -> bool:
        # autolog's copy stands down when the user configured one of their own
        return not (
            self._auto and any(isinstance(cb, EMACallback) and not cb._auto for cb in trainer.callbacks)
        )

    @property
    def state_key(self) -> str:
        # autolog's copy and the user's own can sit in one Trainer, and Lightning refuses two
        # stateful callbacks with the same key
        return self._generate_state_key(auto=True) if self._auto else super().state_key

    @_hook
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self._active(trainer):
            return
        if self.ema is None or self._ema_of is not pl_module:  # a reused callback, another module
            self.ema, self.posthoc = (
                self.ema_options.build(pl_module),
                self.ema_options.build_posthoc(pl_module),
            )
            self._ema_of = pl_module
        self._last_global_step = trainer.global_step  # a new Trainer counts from 0 again
        self._val_names = set()
        if self._restored is not None:
            self.load_state_dict(self._restored)
            self._restored = None
        if self._two_passes:  # first, so that ema/ metrics exist before others' on_validation_end
            trainer.callbacks = [self, *(cb for cb in trainer.callbacks if cb is not self)]
        SESSION.install_run_hooks()
        self._watched = SESSION.add(pl_module, [], driver="lightning", ema=self.ema, posthoc=self.posthoc)
        self._watched.run_tags[RUN_TAG_MODEL_HPARAMS] = json.dumps(_jsonable(dict(pl_module.hparams)))

    @_hook
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._watched is None:
            return
        self._mirror = not _logs_to_mlflow(trainer)
        # autolog's optimizer hooks need not search for the model (this callback steps the EMA)
        SESSION.bind_optimizers(self._watched, trainer.optimizers,
                                [config.scheduler for config in trainer.lr_scheduler_configs])  # fmt: skip

    @_cleanup
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    @_cleanup
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._detach()  # never leave the EMA weights in the model; Lightning skips teardown here

    def _detach(self) -> None:
        self._unswap()
        SESSION.routing.forget_ema_keys()
        if self._watched is not None:
            SESSION.remove(self._watched)
        self._watched = None

    # -- the EMA ----------------------------------------------------------------------------

    @_hook
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._watched is not None:  # the schedulers have stepped: checkpoints' training state is complete
            SESSION.before_own_step(self._watched)

    @_hook
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._watched is None or trainer.global_step <= self._last_global_step:
            return  # gradient accumulation: no optimizer step in this batch
        self._last_global_step = trainer.global_step
        SESSION.update_emas(self._watched, _run_of(trainer))  # the EMA's and the post-hoc EMAs' update
        SESSION.posthoc_snapshot_if_due(self._watched, _run_of(trainer))

    @property
    def _two_passes(self) -> bool:
        return self.validate_with_ema and self.validate_raw

    @_hook
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._watched is None or not self.validate_with_ema or trainer.sanity_checking:
            return
        if self._two_passes and not self._in_ema_pass:
            return  # Lightning's pass: the raw weights
        self._swap = contextlib.ExitStack()
        self._swap.enter_context(self.ema.swap())
        self._swap.enter_context(SESSION.routing.ema_weights_in())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_ema_pass:
            self._end_pass(trainer, ema=True)
            return
        self._end_pass(trainer, ema=self._swap is not None)
        if self._wants_ema_pass(trainer):
            self._run_ema_pass(trainer)  # not behind the boundary: the user's errors propagate
        self._after_validation(trainer)

    @_hook
    def _end_pass(self, trainer: pl.Trainer, *, ema: bool) -> None:
        self._unswap()
        if self._watched is None or trainer.sanity_checking:
            return
        names = _validation_metric_names(trainer)
        if ema and not self._in_ema_pass:
            # Whoever logs these later (mlflow.pytorch.autolog, at epoch end) logs EMA values.
            SESSION.routing.remember_ema_keys(names)
        self._ema_names = names if ema else set()
        self._val_names |= names
        self._log_metrics(trainer, names, prefix=EMA_PREFIX if ema else "")

    @BOUNDARY.guarded(LIGHTNING, default=bool)
    def _wants_ema_pass(self, trainer: pl.Trainer) -> bool:
        return self._watched is not None and self._two_passes and not trainer.sanity_checking

    def _run_ema_pass(self, trainer: pl.Trainer) -> None:
        """Lightning's validation loop again, with the EMA weights and no other callback;
        then ``callback_metrics`` hold the raw values again and the EMA ones as ``ema/``."""
        loop, metrics = trainer.fit_loop.epoch_loop.val_loop, trainer.callback_metrics
        raw, callbacks, mode = dict(metrics), trainer.callbacks, loop._module_mode
        trainer.callbacks, loop._module_mode = [self], type(mode)()  # the outer pass restores `mode`
        self._in_ema_pass = True
        try:
            loop.run()
        finally:
            trainer.callbacks, loop._module_mode, self._in_ema_pass = callbacks, mode, False
            self._unswap()
        for name in self._ema_names:
            if name in metrics:
                metrics[EMA_PREFIX + name] = metrics[name]
            if name in raw:
                metrics[name] = raw[name]

    @_hook
    def _after_validation(self, trainer: pl.Trainer) -> None:
        n = self.checkpoint_every_n_epochs
        if (
            self._watched is not None
            and not trainer.sanity_checking
            and n
            and (trainer.current_epoch + 1) % n == 0
        ):
            self._checkpoint(trainer, epoch=trainer.current_epoch + 1)

    @_hook
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._watched is not None and self._mirror:  # what training logged (validation's is logged)
            names = {k for k in trainer.callback_metrics if not k.startswith(EMA_PREFIX)}
            self._log_metrics(trainer, names - self._val_names, prefix="")

    def _log_metrics(self, trainer: pl.Trainer, names: set[str], *, prefix: str) -> None:
        """Without a logger to MLflow, ``names`` of ``callback_metrics`` go to the active run."""
        if self._mirror:
            _log_to_run(trainer, names, prefix)

    @_hook
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._watched is None:
            return
        run = _run_of(trainer)
        if self.checkpoint_at_end and self.ema.step > 0:
            # after fit, current_epoch counts the epochs run (a last partial one included)
            self._checkpoint(trainer, epoch=trainer.current_epoch)
        SESSION.checkpoints.take_posthoc(self._watched, run=run)  # unless taken at this step
        if run is not None:  # no step comes now: the training states are complete
            SESSION.flush(run[0])

    def _checkpoint(self, trainer: pl.Trainer, *, epoch: int) -> None:
        self._watched.epochs = epoch
        SESSION.checkpoints.take(self._watched, step=trainer.global_step, epoch=epoch, run=_run_of(trainer))

    def _unswap(self) -> None:
        if self._swap is not None:
            self._swap.close()
            self._swap = None

    # -- Lightning checkpoints ----------------------------------------------------------------

    @BOUNDARY.guarded(LIGHTNING, default=dict)
    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        posthoc = {"posthoc": self.posthoc.state_dict()} if self.posthoc is not None else {}
        return {"ema": self.ema.state_dict(), "last_step": self._last_global_step, **posthoc}

    @_hook
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict and self.ema is None:
            self._restored = state_dict  # restored in setup(), once the EMA is made
        elif state_dict:
            self.ema.load_state_dict(state_dict["ema"])
            self._last_global_step = state_dict["last_step"]
            if self.posthoc is not None and "posthoc" in state_dict:
                self.posthoc.load_state_dict(state_dict["posthoc"])

    @_hook
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A .ckpt written with autolog's copy resumes with one's own callback, and the other
        # way round: Lightning passes load_state_dict only the state under this one's key.
        states = checkpoint.get("callbacks") or {}
        if self._watched is None or states.get(self.state_key):
            return
        for key in (super().state_key, self._generate_state_key(auto=True)):
            if states.get(key):
                self.load_state_dict(copy.deepcopy(states[key]))
                return


signature_of(EMACallback.__init__, EMAOptions, keep=("self",))


def _log_to_run(trainer: pl.Trainer, names: set[str], prefix: str) -> None:
    """``names`` of ``callback_metrics``, prefixed, to the Trainer's run (from rank 0)."""
    run, metrics = _run_of(trainer), trainer.callback_metrics
    values = {prefix + k: float(metrics[k]) for k in sorted(names) if k in metrics}
    if run is None or not values or not trainer.is_global_zero:
        return
    import mlflow

    stamp, step = int(time.time() * 1000), trainer.global_step
    mlflow.MlflowClient(run[1]).log_batch(
        run[0], [mlflow.entities.Metric(k, v, stamp, step) for k, v in values.items()]
    )


def _validation_metric_names(trainer: pl.Trainer) -> set[str]:
    """Names the validation loop logged (Lightning's result collection; empty if its
    internals change)."""
    try:
        return {result.meta.name for result in trainer._evaluation_loop._results.values()}
    except (AttributeError, RuntimeError):
        return set()


def _logs_to_mlflow(trainer: pl.Trainer) -> bool:
    """Does something else log the LightningModule's metrics to MLflow: an MLFlowLogger,
    or ``mlflow.pytorch.autolog()``'s callback?"""
    from lightning.pytorch.loggers import MLFlowLogger

    return any(isinstance(logger, MLFlowLogger) for logger in trainer.loggers) or any(
        type(cb).__name__.endswith("MlflowPLCallback") for cb in trainer.callbacks
    )


def _run_of(trainer: pl.Trainer) -> tuple[str, str] | None:
    """The MLFlowLogger's run, else the active run."""
    from lightning.pytorch.loggers import MLFlowLogger

    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger) and logger.run_id:
            return logger.run_id, logger.experiment.tracking_uri
    return active_run()


def _jsonable(value: Any) -> Any:
    """hparams as JSON: what cannot be written as JSON is written as its repr."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


@BOUNDARY.guarded(LIGHTNING_ENTRY, default=list)
def autolog_callbacks() -> list[pl.Callback]:
    """Lightning's ``callbacks_factory`` entry point: the callback, while autolog is on (none
    when it fails: the Trainer is still built)."""
    if not SESSION.autolog_on:
        return []
    c = SESSION.config
    callback = EMACallback(
        checkpoint_every_n_epochs=c.checkpoint_every_n_epochs,
        checkpoint_at_end=c.checkpoint_at_end,
        **vars(c.ema_options()),
    )
    callback._auto = True
    return [callback]
