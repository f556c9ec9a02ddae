"""The safety boundary: mlflow-ema's own bugs never break training.

Every patch and hook mlflow-ema installs in MLflow, torch or Lightning runs behind it,
as MLflow's ``safe_patch`` does for autologging: exceptions from the function that was
patched (MLflow rejecting a metric, a DataLoader's ``StopIteration``) propagate
unchanged; an exception from mlflow-ema's own code is caught, the user's call still
runs (with the user's own arguments when the original has not run yet) and returns the
original's result, and the *part* that failed switches off for the rest of the process:
later calls go straight to the original, or do nothing. The failure is reported once,
as a ``UserWarning`` starting ``mlflow-ema:``, and on the run concerned (else the active
run) in the tag ``mlflow_ema.errors``: a JSON list of ``"<part>: <ExcType>: <message>"``.

A part that takes part in collectives under ``torch.distributed`` (``SHARDED``: the
checkpoint of an FSDP2 model) is switched off on every rank alike or stays on: each
rank runs its local work behind the boundary, then all ranks agree with one small
``all_reduce`` (:meth:`Boundary.agree`); a rank that has switched the part off keeps
answering "not ok" until every rank knows, so no rank is ever left waiting in a
collective the others skip.

``MLFLOW_EMA_STRICT=1`` in the environment re-raises instead (the test suite sets it).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

from mlflow_ema.tags import RUN_TAG_ERRORS

_logger = logging.getLogger("mlflow_ema")

STRICT_ENV = "MLFLOW_EMA_STRICT"

# The parts, each switched off on its own. The names appear in warnings and in the run tag.
LOG_METRIC = "log_metric"
LOG_BATCH = "log_batch"
RUN_END = "run_end"
PRE_STEP = "optimizer_pre_step"
POST_STEP = "optimizer_post_step"
WATCH = "watch_hooks"
EPOCHS = "epoch_detection"
LIGHTNING = "lightning_callback"
LIGHTNING_ENTRY = "lightning_entry_point"
EXIT_FLUSH = "exit_flush"
SHARDED = "sharded_checkpoint"  # collective: off on every rank alike
CAPTURE = "architecture_capture"

PARTS = {
    LOG_METRIC: "the MlflowClient.log_metric patch: ema/ names, links to checkpoints",
    LOG_BATCH: "the MlflowClient.log_batch patch: ema/ names, links to checkpoints",
    RUN_END: "the MlflowClient.set_terminated patch: last checkpoint and uploads at run end",
    PRE_STEP: "the optimizer pre-step hook: which model an optimizer trains",
    POST_STEP: "the optimizer post-step hook: EMA updates and step checkpoints",
    WATCH: "the optimizer hooks of mlflow_ema.watch(): EMA updates and step checkpoints",
    EPOCHS: "the DataLoader iterator patch: epoch ends and epoch checkpoints",
    LIGHTNING: "the Lightning callback: EMA updates, EMA validation, checkpoints",
    LIGHTNING_ENTRY: "the Lightning callbacks_factory entry point: the callback autolog adds",
    EXIT_FLUSH: "the upload flush at interpreter exit",
    SHARDED: "checkpoints of sharded (FSDP2) models, taken by every rank at once",
    CAPTURE: "the forward pre-hook and the export that record the model's architecture",
}
# the run to tag: (run_id, tracking_uri), or how to find it
Run = tuple[str, str] | Callable[[], tuple[str, str] | None] | None
_MAX_MESSAGE = 300  # characters of an exception's message kept in the tag


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes")


def _describe(error: BaseException) -> str:
    try:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    except Exception:  # an exception that cannot say what it is
        message = ""
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _distributed() -> Any:
    """``torch.distributed`` when a process group is up, else None."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


class Boundary:
    """Which parts are switched off, and the ways to run code behind the boundary."""

    def __init__(self) -> None:
        self.off: dict[str, str] = {}  # part -> "<ExcType>: <message>" of the failure that stopped it
        self.settled: set[str] = set()  # collective parts every rank knows are off
        self._errors: dict[str, list[str]] = {}  # run_id -> its tag's entries
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Every part on again (a fresh ``_Session``). In place: wrappers hold this object."""
        with self._lock:
            self.off.clear()
            self.settled.clear()
            self._errors.clear()

    def is_on(self, part: str) -> bool:
        return part not in self.off

    # -- running code behind the boundary ---------------------------------------------------

    def call(self, part: str, fn: Callable[..., Any], *args: Any, run: Run = None) -> Any:
        """``fn(*args)``; None when the part is off or ``fn`` fails (the part then goes off).
        ``run``: the run to tag on failure (default: the active run)."""
        if part in self.off:
            return None
        try:
            return fn(*args)
        except Exception as error:
            self.fail(part, error, run=run)
            return None

    def hook(self, part: str, fn: Callable[[Any, Any, Any], Any]) -> Callable[[Any, Any, Any], None]:
        """A torch optimizer step hook ``fn(optimizer, args, kwargs)`` behind the boundary.
        The hot path: one dict lookup and a try, nothing allocated."""
        off = self.off

        def guarded_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            if part in off:
                return
            try:
                fn(optimizer, args, kwargs)
            except Exception as error:
                self.fail(part, error)

        return guarded_hook

    def guarded(
        self,
        part: str,
        *,
        default: Callable[[], Any] | None = None,
        always: bool = False,
        on_error: Callable[..., Any] | None = None,
        run_of: Callable[..., tuple[str, str] | None] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorate a function (a Lightning hook, an entry point) to run behind the boundary.

        It returns ``default()`` (or None) when the part is off or it fails; ``always`` runs
        it even when off (clean-up that must happen); ``on_error(*args, **kwargs)`` undoes
        what a failure left half done; ``run_of(*args, **kwargs)`` names the run to tag."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def guarded_fn(*args: Any, **kwargs: Any) -> Any:
                if part in self.off and not always:
                    return default() if default else None
                try:
                    return fn(*args, **kwargs)
                except Exception as error:
                    if on_error is not None:
                        try:
                            on_error(*args, **kwargs)
                        except Exception:
                            _logger.debug("mlflow-ema: clean-up after %s failed", part, exc_info=True)
                    run = (lambda: run_of(*args, **kwargs)) if run_of is not None else None
                    self.fail(part, error, run=run)
                    return default() if default else None

            return guarded_fn

        return decorate

    def patch(
        self,
        part: str,
        original: Callable[..., Any],
        prepare: Callable[[tuple, dict], Any],
        after: Callable[[Any], None],
        *,
        bypass: Callable[[], bool] = lambda: False,
        run_of: Callable[[Any], tuple[str, str] | None] | None = None,
    ) -> Callable[..., Any]:
        """``original`` as MLflow's ``safe_patch`` would wrap it. ``prepare(args, kwargs)``
        returns the ``inspect.BoundArguments`` to call the original with (None: the user's own
        arguments); ``after(arguments)`` runs once the original returned. Exceptions from the
        original propagate unchanged; the original always runs, exactly once."""

        def patched(*args: Any, **kwargs: Any) -> Any:
            bound = None if part in self.off or bypass() else self.call(part, prepare, args, kwargs)
            if bound is None:
                return original(*args, **kwargs)
            result = original(*bound.args, **bound.kwargs)  # the original's own errors propagate
            arguments = bound.arguments
            self.call(part, after, arguments, run=(lambda: run_of(arguments)) if run_of else None)
            return result

        return patched

    # -- switching off ------------------------------------------------------------------------

    def fail(self, part: str, error: BaseException, *, run: Run = None) -> None:
        """Switch ``part`` off after ``error``: warn once, tag the run. Strict mode re-raises."""
        if strict():
            raise error
        _logger.debug("mlflow-ema: %s failed", part, exc_info=error)
        self._switch_off(part, _describe(error), run=run)

    def _switch_off(self, part: str, reason: str, *, run: Run = None, rank: int | None = None) -> None:
        with self._lock:
            if part in self.off:
                return
            self.off[part] = reason
        what = f"{part} ({PARTS.get(part, part)})"
        if rank is None:
            message = f"{what} failed and is switched off for the rest of this process"
        else:
            message = f"{what} is switched off on every rank after a failure on rank {rank}"
        try:
            warnings.warn(f"mlflow-ema: {message}; training goes on: {reason}", UserWarning, stacklevel=4)
        except Exception:  # warnings turned into errors (-W error): still never raise
            _logger.warning("mlflow-ema: %s; training goes on: %s", message, reason)
        self._record(f"{part}: {reason}" if rank is None else f"{part}: rank {rank}: {reason}", run)

    def _record(self, entry: str, run: Run) -> None:
        """Add ``entry`` to the run's ``mlflow_ema.errors`` tag (rank 0 only). Never raises."""
        try:
            dist = _distributed()
            if dist is not None and dist.get_rank() != 0:
                return
            import mlflow

            if callable(run):
                run = run()
            if run is None:
                active = mlflow.active_run()
                if active is None:
                    return
                run = (active.info.run_id, mlflow.get_tracking_uri())
            run_id, tracking_uri = run
            with self._lock:
                entries = self._errors.setdefault(run_id, [])
                entries.append(entry)
                value = json.dumps(entries)
            mlflow.MlflowClient(tracking_uri).set_tag(run_id, RUN_TAG_ERRORS, value)
        except Exception as e:  # the warning stands; the tag is a convenience
            _logger.warning("mlflow-ema: could not tag the run with %r: %s", entry, e)

    # -- collective parts ------------------------------------------------------------------------

    def prepare(self, part: str, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """A collective part's local preparation, then :meth:`agree`: ``(True, fn(*args))``
        when every rank is ready and the part is on everywhere, else ``(False, None)``.
        Every rank must call it at the same point, whatever it knows."""
        if part in self.settled:
            return False, None
        result, ok = None, False
        if part not in self.off:
            try:
                result, ok = fn(*args), True
            except Exception as error:
                self.fail(part, error)
        return self.agree(part, ok), (result if ok else None)

    def agree(self, part: str, ok: bool) -> bool:
        """Every rank at once: is ``part`` on and ``ok`` on every rank? One ``all_reduce``
        (MIN) of a one-element tensor. If not, the part goes off on every rank (each warns
        once, rank 0 tags the run with the failing rank's error) and no rank calls a
        collective for it again. Without a process group: ``ok`` and the part is on."""
        if part in self.settled:
            return False
        dist = _distributed()
        mine = bool(ok) and part not in self.off
        if dist is None:
            return mine
        import torch

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([int(mine)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()):
            return True
        reasons = _gather_reasons(dist, device, "" if mine else self.off.get(part, "failed"))
        self.settled.add(part)
        if part not in self.off:
            rank, reason = next((r, m) for r, m in enumerate(reasons) if m)
            self._switch_off(part, reason, rank=rank)
        return False


def _gather_reasons(dist: Any, device: Any, reason: str) -> list[str]:
    """Every rank's failure message ("" for none), as fixed-size UTF-8 tensors: no pickle
    (``all_gather_object`` would unpickle what the other ranks send)."""
    import torch

    size = _MAX_MESSAGE * 4 + 64  # room for the longest message in UTF-8
    data = reason.encode()[:size]
    mine = torch.zeros(size + 1, dtype=torch.uint8, device=device)
    mine[0] = 1 if reason else 0
    mine[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    reasons = []
    for t in gathered:
        raw = bytes(t[1:].cpu().tolist()).rstrip(b"\0")
        reasons.append(raw.decode(errors="replace") or ("failed" if int(t[0]) else ""))
    return reasons


BOUNDARY = Boundary()
