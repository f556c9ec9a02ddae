"""The training side's public API: ``autolog``, ``watch``, ``log_checkpoint``, ``swap``,
``flush``, ``resume`` and ``get_ema``. The work is done by :mod:`mlflow_ema.session` and the
modules it names (``ARCHITECTURE.md`` maps them).

How autolog finds the model. Torch optimizers do not know their module, so at an
optimizer's first ``step()`` (a global step *pre*-hook, so the EMA and its init
fingerprint see the weights before the first update) autolog looks among the modules the
calling code holds (the stack's local variables, two levels deep) for the outermost one
that owns the parameters the optimizer updates (:mod:`mlflow_ema.discovery`). When there is none, or more than one, it warns once and
leaves that optimizer alone: call ``mlflow_ema.watch(model, optimizer)``, which is also
the explicit, no-magic way.

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
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from mlflow_ema.checkpointing import rank_zero
from mlflow_ema.ema import EMA, unwrap_model
from mlflow_ema.errors import MlflowEmaError
from mlflow_ema.options import AutologConfig, EMAOptions, signature_of
from mlflow_ema.resuming import ResumeInfo, as_list, restore
from mlflow_ema.safety import BOUNDARY, EXIT_FLUSH
from mlflow_ema.session import SESSION as _SESSION

__all__ = [
    "AutologConfig",
    "ResumeInfo",
    "autolog",
    "flush",
    "get_ema",
    "log_checkpoint",
    "resume",
    "swap",
    "watch",
]

_logger = logging.getLogger("mlflow_ema")


@BOUNDARY.guarded(EXIT_FLUSH)
def _flush_at_exit() -> None:
    # Runs still open are ended after this by MLflow's own exit handler, which reports.
    if not _SESSION.flush(timeout=600):
        _logger.warning("mlflow-ema: checkpoints were still uploading at exit")


atexit.register(_flush_at_exit)


def autolog(*, disable: bool = False, silent: bool = False, **options: Any) -> None:
    """Keep an EMA of every model trained in this process and log raw and EMA checkpoints
    to the active MLflow run as LoggedModels.

    One line before a plain training loop is enough: the EMA is updated after every
    ``optimizer.step()`` and, by default, checkpoints are logged when the run ends.
    Calling it again replaces the configuration; ``autolog(disable=True)`` removes every
    hook and patch it installed. The options are the fields of
    :class:`mlflow_ema.options.AutologConfig`:

    Args:
        decay: the EMA decay or schedule (default ``WarmupDecay(0.9999, power=3/4)``,
            which suits runs from a few hundred steps to ~100k).
        update_every, start_step, ema_dtype, ema_device: as for :class:`mlflow_ema.EMA`.
        posthoc_every_n_steps, posthoc_sigma_rels: post-hoc EMA: keep one power-function EMA
            per ``sigma_rel`` (default 0.05 and 0.10; fp32 unless ``ema_dtype``, updated at every
            optimizer step) and log a snapshot of each (``posthoc<sigma_rel>-step<N>``) every N
            optimizer steps and when the run ends, so that ``mlflow-ema posthoc`` can choose the
            EMA length after training (README, "Post-hoc EMA"). Default: off.
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
            rebuild the model, recorded on the run. Not needed when the model exports with
            ``torch.export``: its architecture is recorded from its first forward (see the
            README, "What is stored"); needed for ``--update-bn`` and ``--serialization pickle``.
        log_input_examples: keep the first rows of a real forward input as the registered
            model's input example (default: synthetic values of its shape and dtype).
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
        session.flush(timeout=600)
        session.uninstall()
        return
    session.config = AutologConfig(**options, silent=silent)
    session.uploader.max_queue = session.config.max_queue
    session.uploader.max_shard_size = session.config.max_shard_size
    session.install_run_hooks()
    session.patches.install_step_hooks()
    session.autolog_on = True


signature_of(autolog, AutologConfig)


def watch(
    model: nn.Module,
    optimizer: Any | Sequence[Any] | None = None,
    *,
    ema: EMA | None = None,
    name: str | None = None,
    model_factory: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    posthoc_every_n_steps: int | None = None,
    posthoc_sigma_rels: Sequence[float] | None = None,
) -> EMA:
    """Keep an EMA of ``model``, updated after each ``optimizer.step()``, and log its
    checkpoints like autolog does (with autolog's configuration, or its defaults).

    The explicit API: no search for the model. Without ``optimizer``, call
    ``ema.update()`` yourself (post-hoc EMAs then need an optimizer). Pass ``ema=`` to use
    an EMA you built; ``name`` tells several watched models apart (checkpoint names and
    the tag ``mlflow_ema.model``). ``posthoc_every_n_steps`` and ``posthoc_sigma_rels``
    are autolog's (and default to its configuration). Returns the EMA.
    """
    session = _SESSION
    optimizers = as_list(optimizer)
    target = unwrap_model(model)
    if any(w.model is target for w in session.watched):
        raise MlflowEmaError(f"{type(target).__name__} is already watched")
    posthoc = _posthoc_options(posthoc_every_n_steps, posthoc_sigma_rels).build_posthoc(model)
    session.install_run_hooks()
    w = session.add(model, optimizers, driver="watch", ema=ema, name=name, model_factory=model_factory,
                    model_kwargs=model_kwargs, posthoc=posthoc)  # fmt: skip
    for opt in optimizers:
        session.by_optimizer[opt] = w
    if optimizers:  # the first optimizer's steps drive the EMA
        session.patches.hook_optimizer(optimizers[0], w)
    return w.ema


def _posthoc_options(every_n_steps: int | None, sigma_rels: Sequence[float] | None) -> EMAOptions:
    """autolog's EMA options with watch()'s post-hoc ones, where given."""
    config = _SESSION.config.ema_options()
    return dataclasses.replace(
        config,
        posthoc_every_n_steps=config.posthoc_every_n_steps if every_n_steps is None else every_n_steps,
        posthoc_sigma_rels=config.posthoc_sigma_rels if sigma_rels is None else tuple(sigma_rels),
    )


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
    if not session.watched and not rank_zero():
        return  # ema_ranks="zero", or a model watched on rank 0 only: nothing to do here
    targets = session.select(model)
    if metrics and rank_zero():
        import mlflow

        if mlflow.active_run() is not None:
            log_step = targets[0].ema.step if step is None else int(step)
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=log_step)
    for w in targets:
        session.checkpoints.take(w, step=step, epoch=epoch)


@contextlib.contextmanager
def swap(model: nn.Module | None = None) -> Iterator[None]:
    """Evaluate with the EMA weights: the watched model(s) hold them inside the block,
    and metrics logged to MLflow from this thread meanwhile get the ``ema/`` prefix
    (``val_acc`` -> ``ema/val_acc``), so they link to the EMA checkpoint of their step."""
    with contextlib.ExitStack() as stack:
        for w in _SESSION.select(model):
            stack.enter_context(w.ema.swap())
        stack.enter_context(_SESSION.routing.ema_weights_in())
        yield


def get_ema(model: nn.Module | None = None) -> EMA:
    """The EMA autolog or watch keeps for ``model`` (default: the only watched model)."""
    targets = _SESSION.select(model)
    if len(targets) > 1:
        raise MlflowEmaError("several models are watched: pass the model")
    return targets[0].ema


def flush(timeout: float | None = None) -> bool:
    """Wait until every queued checkpoint is uploaded (or given up on); False on timeout."""
    return _SESSION.flush(timeout=timeout)


def resume(
    model: nn.Module,
    optimizer: Any | Sequence[Any] | None = None,
    scheduler: Any | Sequence[Any] | None = None,
    *,
    run_id: str | None = None,
    checkpoint: str | Path | None = None,
    name: str | None = None,
) -> ResumeInfo:
    """Restore the weights, optimizer, scheduler, EMA and RNG state from the latest raw
    checkpoint logged with ``log_training_state=True``, and watch the model so training
    continues where it stopped. Resume inside ``mlflow.start_run(run_id=...)`` to keep
    logging into the same run.

    ``run_id`` defaults to the active run; ``checkpoint`` is a local checkpoint folder
    to use instead. In a run that trains several models, resume each: ``name`` is the
    model's name there (default: its class name in lower case; ``watch(name=)``'s if it had
    one). Returns the step and epoch to continue from.
    """
    optimizers, schedulers = as_list(optimizer), as_list(scheduler)
    state, info = restore(model, optimizers, schedulers, run_id=run_id, checkpoint=checkpoint, name=name)
    target = unwrap_model(model)
    existing = [w for w in _SESSION.watched if w.model is target]
    if not existing:
        watch(model, optimizers or None, name=name)
    w = existing[0] if existing else _SESSION.watched[-1]
    w.ema.load_state_dict(state["ema"])
    _restore_posthoc(w, state.get("posthoc"))
    w.optimizer_steps = w.ema.step
    w.schedulers = schedulers or w.schedulers
    w.epochs = state["epoch"] or 0
    return info


def _restore_posthoc(w: Any, state: dict[str, Any] | None) -> None:
    """The post-hoc EMAs from a checkpoint's training state, when both have them."""
    if w.posthoc is not None and state is not None:
        w.posthoc.load_state_dict(state)
    elif w.posthoc is not None:
        _logger.warning(
            "mlflow-ema: the checkpoint has no post-hoc EMAs: they start from the current weights"
        )
    elif state is not None:
        _logger.warning(
            "mlflow-ema: the checkpoint has post-hoc EMAs but post-hoc EMA is off now "
            "(autolog(posthoc_every_n_steps=N)): they are not restored"
        )
