"""Finding the model and the schedulers an optimizer belongs to.

Torch optimizers do not know their module, so at an optimizer's first ``step()`` autolog
looks among the live ``nn.Module`` objects for the outermost one that owns every parameter
the optimizer updates (unwrapping DDP and ``torch.compile``), and among the live
schedulers for those attached to it (their state goes into the training state).
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mlflow_ema.ema import unwrap_model

SCHEDULER_TYPES = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def find_model(optimizer: Any, live: list[Any] | None = None) -> nn.Module | None:
    """The outermost live module owning every parameter ``optimizer`` updates, as the user
    calls it (a DDP or ``torch.compile`` wrapper: :func:`unwrap_model` gives the model); None
    when there is no such module or several unrelated ones."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not params:
        return None
    modules = [
        obj for obj in (live if live is not None else live_objects(nn.Module)) if isinstance(obj, nn.Module)
    ]
    children = {id(child) for m in modules for child in m._modules.values() if child is not None}
    owners = {id(m) for m in modules if any(id(p) in params for p in m._parameters.values() if p is not None)}
    if not owners:
        return None
    roots = [m for m in modules if id(m) not in children and params <= {id(p) for p in m.parameters()}]
    unwrapped = {id(unwrap_model(m)): m for m in roots}
    return next(iter(unwrapped.values())) if len(unwrapped) == 1 else None


def find_schedulers(optimizers: Sequence[Any], live: list[Any] | None = None) -> list[Any]:
    """Learning-rate schedulers attached to ``optimizers``, so training state includes them."""
    ids = {id(o) for o in optimizers}
    candidates = live if live is not None else live_objects(SCHEDULER_TYPES)
    return [
        s for s in candidates if isinstance(s, SCHEDULER_TYPES) and id(getattr(s, "optimizer", None)) in ids
    ]


def live_objects(cls: type | tuple[type, ...]) -> list[Any]:
    """Live objects of a class. Once per optimizer, never per step."""
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        # weakref proxies (Lightning keeps one of its module) pass isinstance but are not modules
        return [
            obj
            for obj in gc.get_objects()
            if not isinstance(obj, weakref.ProxyTypes) and isinstance(obj, cls)
        ]
