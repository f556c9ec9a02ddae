"""Point-in-time copies of tensors on the CPU, taken in the training step and written later.

On CUDA the copies go into pinned memory with ``non_blocking=True`` and
:meth:`Snapshot.wait` blocks (on the writer's thread, not the training loop)
until the copy stream has caught up; on the CPU they are plain clones.
"""

from __future__ import annotations

import dataclasses
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
        """The copied structure, once every asynchronous device copy has landed."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self.value


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
