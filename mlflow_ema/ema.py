"""Exponential moving average of a model's weights."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn

from mlflow_ema.checkpoint import init_fingerprint
from mlflow_ema.errors import IncompatibleModelError
from mlflow_ema.schedules import (
    DecaySchedule,
    as_schedule,
    schedule_from_dict,
    schedule_to_dict,
)

STATE_VERSION = 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers, so names carry no wrapper prefix."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are DTensors (FSDP2's ``fully_shard``, tensor
    parallelism): each rank holds only its shards."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view of its storage, so writes reach the
    model), or the tensor itself."""
    dtensor = _dtensor_type()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


class _Gathered(Mapping):
    """The model's parameters with DTensors gathered one at a time, on access: the init
    fingerprint of a sharded model without holding the full model at once. Every rank
    must read it in the same order (the gathers are collectives)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        return tensor.full_tensor() if _local(tensor) is not tensor else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


@dataclasses.dataclass
class _Layout:
    """What one scan of a model finds: the tensors to average and the ones to mirror."""

    averaged: dict[str, torch.Tensor]  # canonical name -> the model's tensor (Parameter or buffer)
    mirrored: dict[str, torch.Tensor]  # integer buffers and, by option, float buffers / frozen params
    state_keys: dict[str, str]  # model.state_dict() key -> canonical name (tied weights share one)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in {**self.averaged, **self.mirrored}.items()}


@dataclasses.dataclass
class _Group:
    """Tensors that share (model device, model dtype, shadow device, shadow dtype):
    one fused foreach call updates them all."""

    shadow: list[torch.Tensor]
    model: list[torch.Tensor]
    staging: list[torch.Tensor] | None  # cast / device copy of the weights when layouts differ
    model_device: torch.device
    model_dtype: torch.dtype
    deferred: bool  # CUDA weights into a CPU shadow: average once the async copy is done


def _scan(model: nn.Module, buffers: str, frozen: str) -> _Layout:
    averaged: dict[str, torch.Tensor] = {}
    mirrored: dict[str, torch.Tensor] = {}
    name_of: dict[int, str] = {}
    named = [(n, p, True) for n, p in model.named_parameters(remove_duplicate=False)]
    named += [(n, b, False) for n, b in model.named_buffers(remove_duplicate=False)]
    for name, tensor, is_param in named:
        if id(tensor) in name_of:  # tied weights: one shadow under the first name
            continue
        name_of[id(tensor)] = name
        average = tensor.is_floating_point() and (
            (is_param and (tensor.requires_grad or frozen == "average"))
            or (not is_param and buffers == "average")
        )
        (averaged if average else mirrored)[name] = tensor
    state_keys = {
        key: name_of[id(value)]
        for key, value in model.state_dict(keep_vars=True).items()
        if isinstance(value, torch.Tensor) and id(value) in name_of
    }
    return _Layout(averaged, mirrored, state_keys)


def _describe_mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str | None:
    """One line naming the first few missing, unexpected and reshaped tensors, or None."""

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    reshaped = [
        f"{n} {list(found[n])} vs {list(expected[n])}"
        for n in expected
        if n in found and found[n] != expected[n]
    ]
    parts = []
    if missing:
        parts.append(f"missing {some(missing)}")
    if unexpected:
        parts.append(f"unexpected {some(unexpected)}")
    if reshaped:
        parts.append(f"shape differs for {some(reshaped)}")
    return "; ".join(parts) or None


def _default_dtype(dtype: torch.dtype) -> torch.dtype:
    # Low-precision weights (fp16, bf16, fp8) are averaged in fp32: with a decay of
    # 0.9999 a bf16 shadow could not move at all (its 8-bit mantissa rounds the step away).
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def _check_options(
    buffers: str, frozen: str, update_every: Any, start_step: Any, dtype: torch.dtype | None
) -> None:
    """The ValueError of the first invalid :class:`EMA` option, if any."""
    if buffers not in ("average", "copy"):
        raise ValueError(f"buffers must be 'average' or 'copy', got {buffers!r}")
    if frozen not in ("average", "copy"):
        raise ValueError(f"frozen must be 'average' or 'copy', got {frozen!r}")
    if not (isinstance(update_every, int) and update_every >= 1):
        raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")
    if not (isinstance(start_step, int) and start_step >= 0):
        raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")


def _build_plan(
    averaged: Mapping[str, torch.Tensor], shadows: dict[str, torch.Tensor], device: torch.device | None
) -> list[_Group]:
    """The averaged weights and their shadows grouped for fused foreach updates, with a
    staging buffer per weight when the shadow's device or dtype differs. With no fixed EMA
    ``device``, a shadow follows its weight to the device the model was moved to since it
    was made (``model.cuda()``): ``shadows`` is updated in place."""
    groups: dict[tuple, _Group] = {}
    for name, weight in averaged.items():
        weight = _local(weight)
        shadow = shadows[name]
        if device is None and shadow.device != weight.device:
            shadow = shadows[name] = shadow.to(weight.device)
        key = (weight.device, weight.dtype, shadow.device, shadow.dtype)
        group = groups.get(key)
        if group is None:
            needs_staging = weight.device != shadow.device or weight.dtype != shadow.dtype
            deferred = weight.device.type == "cuda" and shadow.device.type == "cpu"
            group = groups[key] = _Group(
                [], [], [] if needs_staging else None, weight.device, weight.dtype, deferred
            )
        group.shadow.append(shadow)
        group.model.append(weight)
        if group.staging is not None:
            group.staging.append(torch.empty_like(shadow, pin_memory=group.deferred))
    return list(groups.values())


class EMA:
    """Keeps an exponential moving average (EMA) of a model's weights.

    ``shadow = decay * shadow + (1 - decay) * weights`` after each :meth:`update`,
    with the decay given by a schedule (:mod:`mlflow_ema.schedules`). The shadow
    starts as a copy of the model's weights, not zeros, and lives in memory the
    EMA owns (no deep copy of the module): evaluate with the averaged weights
    inside :meth:`swap`, or write them into a model with :meth:`copy_to`.

    What is averaged:

    - floating-point parameters, kept in ``dtype`` (by default fp32 for fp16/bf16
      weights, otherwise their own dtype) on ``device`` (by default the weights'
      device; on CUDA weights with a CPU ``device`` the copies go through pinned
      memory without blocking the training step);
    - floating-point buffers such as BatchNorm's running statistics when
      ``buffers="average"`` (the default, as in timm); with ``buffers="copy"`` the
      EMA uses the model's current buffers;
    - parameters with ``requires_grad=False``: averaged like the rest with
      ``frozen="average"`` (the default: safe when layers are unfrozen later, and
      exact for weights that never change); ``frozen="copy"`` uses their current
      values instead and skips the work. ``requires_grad`` is read when the EMA is
      built.

    Integer buffers (``num_batches_tracked``) are never averaged: the EMA uses the
    model's current values. Nothing that is not averaged is stored twice.

    Args:
        model: the model to follow; DDP and ``torch.compile`` wrappers are unwrapped.
        decay: a float in (0, 1) for a constant decay, or a schedule ``t -> decay``
            where ``t`` counts averaging updates from 1.
        update_every: average on every N-th call to :meth:`update` only.
        start_step: until this many calls to :meth:`update`, copy the weights
            instead of averaging them.
        dtype: dtype of the averaged tensors (see above).
        device: where the averaged tensors live (see above).
        buffers: ``"average"`` or ``"copy"`` floating-point buffers.
        frozen: ``"average"`` or ``"copy"`` parameters with ``requires_grad=False``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        decay: float | DecaySchedule = 0.9999,
        update_every: int = 1,
        start_step: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        buffers: Literal["average", "copy"] = "average",
        frozen: Literal["average", "copy"] = "average",
    ) -> None:
        _check_options(buffers, frozen, update_every, start_step, dtype)
        self.schedule = as_schedule(decay)
        self.update_every = update_every
        self.start_step = start_step
        self.step = 0  # calls to update()
        self.num_updates = 0  # averaging updates (those after start_step)
        self.last_decay: float | None = None
        self._dtype = dtype
        self._device = torch.device(device) if device is not None else None
        self._policy = (buffers, frozen)
        self._model = unwrap_model(model)
        self._layout = _scan(self._model, buffers, frozen)
        if not self._layout.averaged:
            raise IncompatibleModelError(
                f"{type(self._model).__name__} has no floating-point tensors to average"
            )
        with torch.no_grad():
            # A sharded (DTensor) weight is averaged shard by shard: each rank keeps the EMA
            # of its own shards and an update needs no communication.
            self._shadow = {}
            for name, t in self._layout.averaged.items():
                dtype = self._dtype or _default_dtype(t.dtype)
                self._shadow[name] = (
                    _local(t).detach().to(device=self._device or t.device, dtype=dtype, copy=True)
                )
        # Identifies the starting weights: averaging later refuses runs that differ. Parameters
        # only: BatchNorm statistics already move in the forward pass before the first step.
        # Sharded weights are gathered for it one at a time, once.
        self.init_fingerprint = init_fingerprint(_Gathered(dict(self._model.named_parameters())))
        self._swapped = False
        self._pending: list[tuple[Any, _Group, str, float]] = []
        self._plan = _build_plan(self._layout.averaged, self._shadow, self._device)

    # -- the hot path: get_decay -> update -> _apply --------------------------------

    def get_decay(self, t: int) -> float:
        """The decay of the ``t``-th averaging update (``t`` counts from 1)."""
        decay = float(self.schedule(t))
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay schedule returned {decay!r} for t={t}: must be in [0, 1]")
        return decay

    @torch.no_grad()
    def update(self, model: nn.Module | None = None) -> None:
        """Move the average toward the model's current weights; call after ``optimizer.step()``.

        ``model`` defaults to the model the EMA was built with; passing another model
        of the same structure (e.g. its DDP wrapper) makes the EMA follow that one.
        """
        if model is not None:
            self._bind(model)
        if self._swapped:
            raise RuntimeError("EMA.update() called inside EMA.swap(): the model holds EMA weights")
        self.step += 1
        if self.step % self.update_every:
            return
        if self.step <= self.start_step:
            self._apply("copy", 1.0)
            return
        self.num_updates += 1
        decay = self.get_decay(self.num_updates)
        self._apply("lerp", 1.0 - decay)
        self.last_decay = decay

    def _apply(self, op: str, weight: float) -> None:
        self._finish_pending()
        if any(g.model[0].device != g.model_device or g.model[0].dtype != g.model_dtype for g in self._plan):
            # the model was moved or cast since
            self._plan = _build_plan(self._layout.averaged, self._shadow, self._device)
        for group in self._plan:
            source = group.model
            if group.staging is not None:
                torch._foreach_copy_(group.staging, group.model, non_blocking=group.deferred)
                source = group.staging
                if group.deferred:
                    event = torch.cuda.Event()
                    event.record()
                    self._pending.append((event, group, op, weight))
                    continue
            _average(op, group.shadow, source, weight)

    def _finish_pending(self) -> None:
        for event, group, op, weight in self._pending:
            event.synchronize()
            _average(op, group.shadow, group.staging, weight)
        self._pending.clear()

    # -- binding to a model -----------------------------------------------------------

    def _layout_of(self, model: nn.Module) -> _Layout:
        model = unwrap_model(model)
        if model is self._model:
            return self._layout
        layout = _scan(model, *self._policy)
        problem = _describe_mismatch(self._layout.shapes(), layout.shapes())
        if problem is None and layout.averaged.keys() != self._layout.averaged.keys():
            problem = "its trainable / frozen parameters differ from the EMA's"
        if problem:
            raise IncompatibleModelError(
                f"{type(model).__name__} does not match the model this EMA was built for: {problem}"
            )
        return layout

    def _bind(self, model: nn.Module) -> None:
        if unwrap_model(model) is self._model:
            return
        self._finish_pending()
        self._layout = self._layout_of(model)
        self._model = unwrap_model(model)
        self._plan = _build_plan(self._layout.averaged, self._shadow, self._device)

    # -- using the averaged weights ---------------------------------------------------

    @contextlib.contextmanager
    def swap(self) -> Iterator[nn.Module]:
        """Put the EMA weights into the model for the ``with`` block, then restore the
        raw weights bit for bit (from a copy taken on entry, not from the shadow)::

            with ema.swap():
                val_acc = evaluate(model)
        """
        if self._swapped:
            raise RuntimeError("EMA.swap() is already active")
        self._finish_pending()
        targets = [_local(self._layout.averaged[n]) for n in self._shadow]
        with torch.no_grad():
            raw = [t.detach().clone() for t in targets]
            torch._foreach_copy_(targets, list(self._shadow.values()))
        self._swapped = True
        try:
            yield self._model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(targets, raw)
            self._swapped = False

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the EMA weights into ``model`` (default: the model followed), e.g. at the
        end of training or into a separate evaluation copy."""
        self._finish_pending()
        layout = self._layout if model is None else self._layout_of(model)
        torch._foreach_copy_([_local(layout.averaged[n]) for n in self._shadow], list(self._shadow.values()))
        if layout is not self._layout and layout.mirrored:
            names = list(self._layout.mirrored)
            torch._foreach_copy_(
                [_local(layout.mirrored[n]) for n in names],
                [_local(self._layout.mirrored[n]).detach() for n in names],
            )

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights keyed as ``model.state_dict()``: the averaged tensors (in the
        EMA's dtype and device) and the model's own for what is not averaged. Tied
        weights appear under each of their names as one tensor. No copies are made.
        A sharded model's averaged weights come as DTensors over this rank's shards, like
        its own ``state_dict()``."""
        self._finish_pending()
        live = {n: t.detach() for n, t in self._layout.mirrored.items()}
        averaged = {name: self._as_model_tensor(name) for name in self._shadow}
        return {
            key: averaged[name] if name in averaged else live[name]
            for key, name in self._layout.state_keys.items()
        }

    def _as_model_tensor(self, name: str) -> torch.Tensor:
        weight, shadow = self._layout.averaged[name], self._shadow[name]
        if _local(weight) is weight:
            return shadow
        return type(weight).from_local(
            shadow, weight.device_mesh, weight.placements, run_check=False, shape=weight.shape,
            stride=weight.stride(),
        )  # fmt: skip

    # -- saving and resuming ----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit: the averaged tensors,
        the counters and the schedule. Safe for ``torch.load(weights_only=True)``."""
        self._finish_pending()
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "num_updates": self.num_updates,
            "last_decay": self.last_decay,
            "update_every": self.update_every,
            "start_step": self.start_step,
            "schedule": schedule_to_dict(self.schedule),
            "init_fingerprint": self.init_fingerprint,
            "shadow": dict(self._shadow),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses the state of an EMA of another model.
        A schedule of the library's own is restored too; a custom one stays as built."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise IncompatibleModelError(f"not an mlflow-ema EMA state (version {STATE_VERSION} expected)")
        shadow = state["shadow"]
        problem = _describe_mismatch(
            {n: tuple(t.shape) for n, t in self._shadow.items()},
            {n: tuple(t.shape) for n, t in shadow.items()},
        )
        if problem:
            raise IncompatibleModelError(f"EMA state does not match this model: {problem}")
        self._finish_pending()
        torch._foreach_copy_(list(self._shadow.values()), [shadow[n] for n in self._shadow])
        self.step = int(state["step"])
        self.num_updates = int(state["num_updates"])
        self.last_decay = state["last_decay"]
        self.update_every = int(state["update_every"])
        self.start_step = int(state["start_step"])
        self.init_fingerprint = state["init_fingerprint"]
        restored = schedule_from_dict(state["schedule"])
        if restored is not None:
            self.schedule = restored
        elif schedule_to_dict(self.schedule)["name"] != "custom":
            warnings.warn(
                "the saved EMA used a custom decay schedule; keeping the one this EMA was built with",
                stacklevel=2,
            )

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self._shadow.values())
        return (
            f"EMA({len(self._shadow)} tensors, {n:,} values, schedule={self.schedule!r}, "
            f"step={self.step}, updates={self.num_updates})"
        )


def _average(op: str, shadow: list[torch.Tensor], source: list[torch.Tensor], weight: float) -> None:
    if op == "copy":
        torch._foreach_copy_(shadow, source)
    else:
        torch._foreach_lerp_(shadow, source, weight)
