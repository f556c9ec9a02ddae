"""Finding the model and the schedulers an optimizer belongs to, without scanning the heap.

Torch optimizers do not know their module. At an optimizer's first ``step()``, the code
that calls it holds the model: the training loop's ``model`` variable, a trainer's
``self.model``, a list of models. :func:`held_objects` collects what the frames on the call
stack hold (their local variables, and two levels into the objects and containers those
hold), and :func:`find_model` picks, among the modules there, the outermost one that owns
every parameter the optimizer updates (a DDP or ``torch.compile`` wrapper is kept: the loop
calls it). The cost depends on the stack, not on the heap: well under a millisecond
(``benchmarks/discovery.py``), where a scan of ``gc.get_objects()`` took 0.7 s in a process
of 5 million objects. A model the stack does not hold (kept only in a global of another
module, say) is not found: autolog warns and ``mlflow_ema.watch(model, optimizer)`` says it.
"""

from __future__ import annotations

import sys
import types
import warnings
import weakref
from collections.abc import Iterable, Sequence
from types import FrameType
from typing import Any

import torch
from torch import nn

from mlflow_ema.ema import unwrap_model

SCHEDULER_TYPES = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
MAX_FRAMES = 64  # stack frames looked at, innermost first
DEPTH = 2  # levels looked into below a local variable: a trainer's self.models["G"]
_CONTAINERS = (list, tuple, dict)
_WANTED = (nn.Module, *SCHEDULER_TYPES)
# Values not looked into: their attributes are code or data, not the training's objects.
_NOT_HOLDERS = (type, str, bytes, int, float, types.ModuleType, types.FunctionType, types.MethodType,
                types.BuiltinFunctionType, torch.Tensor)  # fmt: skip


def held_objects(frame: FrameType | None = None, *, max_frames: int = MAX_FRAMES) -> list[Any]:
    """Modules and schedulers held by the frames from ``frame`` (default: the caller's) up
    the stack: local variables, and the attributes and items of the objects and containers
    they hold (:data:`DEPTH` levels). Each object once, in the order found."""
    frame = frame if frame is not None else sys._getframe(1)
    found: dict[int, Any] = {}
    seen: set[int] = set()
    for _ in range(max_frames):
        if frame is None:
            break
        for value in _frame_values(frame):
            _collect(value, found, seen, depth=DEPTH)
        frame = frame.f_back
    return list(found.values())


def _frame_values(frame: FrameType) -> Iterable[Any]:
    try:
        return list(frame.f_locals.values())
    except Exception:  # a frame that cannot show its locals: nothing to find there
        return ()


def _collect(value: Any, found: dict[int, Any], seen: set[int], depth: int) -> None:
    if id(value) in seen:
        return
    seen.add(id(value))
    try:
        items = _held_by(value, found, depth)
    except Exception:  # a user object whose attributes raise: nothing to find in it
        return
    for item in items:
        _collect(item, found, seen, depth - 1)


def _held_by(value: Any, found: dict[int, Any], depth: int) -> list[Any]:
    """What to look into below ``value`` (recording it first if it is wanted)."""
    if isinstance(value, weakref.ProxyTypes):
        return []
    if isinstance(value, _WANTED):
        found[id(value)] = value
        return []
    if depth == 0 or isinstance(value, _NOT_HOLDERS):
        return []
    if not isinstance(value, _CONTAINERS):
        value = getattr(value, "__dict__", None)
        if not isinstance(value, dict):
            return []
    if len(value) > 256:  # a dataset, not a model zoo
        return []
    return list(value.values() if isinstance(value, dict) else value)


def find_model(optimizer: Any, held: Sequence[Any]) -> nn.Module | None:
    """Among ``held``, the outermost module owning every parameter ``optimizer`` updates, as
    the user calls it (a DDP or ``torch.compile`` wrapper: :func:`unwrap_model` gives the
    model); None when there is no such module or several unrelated ones."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not params:
        return None
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        modules = [obj for obj in held if isinstance(obj, nn.Module)]
    owners = [m for m in modules if params <= {id(p) for p in m.parameters()}]
    inside = {id(sub) for m in owners for sub in m.modules() if sub is not m}
    roots = [m for m in owners if id(m) not in inside]
    unwrapped = {id(unwrap_model(m)): m for m in roots}
    return next(iter(unwrapped.values())) if len(unwrapped) == 1 else None


def find_schedulers(optimizers: Sequence[Any], held: Sequence[Any]) -> list[Any]:
    """Learning-rate schedulers in ``held`` attached to ``optimizers`` (their state goes into
    the training state)."""
    ids = {id(o) for o in optimizers}
    return [s for s in held if isinstance(s, SCHEDULER_TYPES) and id(getattr(s, "optimizer", None)) in ids]
