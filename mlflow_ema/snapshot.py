"""Point-in-time copies of tensors on the CPU, taken in the training step and written later.

On CUDA the copies go into pinned memory with ``non_blocking=True`` and
:meth:`Snapshot.wait` blocks (on the writer's thread, not the training loop)
until the copy stream has caught up; on the CPU they are plain clones.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

import torch


@dataclasses.dataclass
class Snapshot:
    """CPU copies of the tensors in a nested structure (dicts, lists, tuples), plus
    whatever non-tensor values it held."""

    value: Any
    _event: Any = None

    def wait(self) -> Any:
        """The copied structure, once every asynchronous device copy has landed and
        every :class:`Later` in a top-level dict has been taken."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        if isinstance(self.value, dict):
            return {k: v.wait() if isinstance(v, Later) else v for k, v in self.value.items()}
        return self.value


class Later:
    """A part of a snapshot taken at a later moment (another thread waits for it).

    A training step's checkpoint is taken right after ``optimizer.step()``, but the
    loop steps its LR scheduler after that: the scheduler's state is taken when the
    next step begins, so a resumed run continues with the right learning rate.
    """

    def __init__(self) -> None:
        self._done = threading.Event()
        self._snapshot: Snapshot | None = None

    def take(self, value: Any) -> None:
        self._snapshot = take_snapshot(value)
        self._done.set()

    def wait(self) -> Any:
        self._done.wait()
        return self._snapshot.wait()


def take_snapshot(value: Any) -> Snapshot:
    """Copy every tensor in ``value`` to the CPU. Tensors shared under several keys
    (tied weights) stay shared in the copy."""
    copies: dict[int, torch.Tensor] = {}
    asynchronous = False

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal asynchronous
        tensor = tensor.detach()
        # state_dict() detaches tied weights into distinct objects over one storage
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tensor.shape,
            tensor.stride(),
            tensor.dtype,
        )
        key = key if tensor.numel() else id(tensor)
        if key not in copies:
            if tensor.device.type == "cuda":
                out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                out.copy_(tensor, non_blocking=True)
                asynchronous = True
            else:
                out = tensor.clone(memory_format=torch.contiguous_format)
            copies[key] = out
        return copies[key]

    def walk(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return copy(item)
        if isinstance(item, Mapping):
            return {k: walk(v) for k, v in item.items()}
        if isinstance(item, tuple) and hasattr(item, "_fields"):  # namedtuple
            return type(item)(*(walk(v) for v in item))
        if isinstance(item, (list, tuple)):
            return type(item)(walk(v) for v in item)
        return item

    value = walk(value)
    event = None
    if asynchronous:
        event = torch.cuda.Event()
        event.record()
    return Snapshot(value, event)


def gather_sharded(model: Any, ema: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full state dicts of a sharded (FSDP2 / DTensor) model and of its EMA, gathered to
    rank 0's CPU one tensor at a time by ``torch.distributed.checkpoint.state_dict``
    (``full_state_dict=True, cpu_offload=True``). A collective: every rank must call it, at
    the same point; the other ranks get empty dicts. The EMA's shards are swapped into the
    model for its gather, so its checkpoint has the model's parameter dtype."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    raw = get_model_state_dict(model, options=options)
    with ema.swap():
        averaged = get_model_state_dict(model, options=options)
    return raw, averaged
