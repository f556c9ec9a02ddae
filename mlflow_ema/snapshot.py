"""Point-in-time copies of tensors on the CPU, taken in the training step and written later.

On CUDA the copies go into pinned memory with ``non_blocking=True`` and
:meth:`Snapshot.wait` blocks (on the writer's thread, not the training loop)
until the copy stream has caught up; on the CPU they are plain clones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
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


@dataclasses.dataclass
class MergedSnapshots:
    """Snapshots of dicts taken at different moments, read as one dict (later ones win).
    A checkpoint's training state is two: the EMA and RNG state when the checkpoint is
    taken, the optimizers' and schedulers' when the next step begins."""

    parts: list[Snapshot]

    def wait(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in self.parts:
            merged.update(part.wait())
        return merged


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


def gather_posthoc(model: Any, emas: list[Any]) -> list[dict[str, torch.Tensor]]:
    """Full state dicts of a sharded model's post-hoc EMAs, gathered to rank 0 like
    :func:`gather_sharded` (a collective: every rank calls it at the same point)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    states = []
    for ema in emas:
        with ema.swap():
            states.append(get_model_state_dict(model, options=options))
    return states


def _part_files(folder: Path, rank: int) -> tuple[Path, Path]:
    return folder / f"rank{rank:05d}.safetensors", folder / f"rank{rank:05d}.json"


def save_part(folder: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Write this rank's part of a sharded state dict into ``folder``: the local shard of
    each DTensor with where it sits in the full tensor (``DTensor.__create_chunk_list__``),
    and, from rank 0 only, the tensors every rank holds whole (buffers). No communication.
    The layout file is renamed into place last, so a part that exists is complete."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    rank = dist.get_rank()
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        if hasattr(tensor, "to_local"):  # DTensor: this rank's chunk
            (chunk,) = tensor.__create_chunk_list__()
            layout[name] = {"shape": list(tensor.shape), "offsets": list(chunk.offsets)}
            tensor = tensor.to_local()
        elif rank == 0:
            layout[name] = {"shape": None, "offsets": None}
        else:
            continue
        tensors[name] = tensor.to("cpu", copy=True).contiguous()
    weights, index = _part_files(folder, rank)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, weights, metadata={"format": "pt"})
    partial = index.with_suffix(".json.partial")
    partial.write_text(json.dumps(layout))
    os.replace(partial, index)


class MergedParts:
    """The full state dict of the parts that ``world`` ranks wrote with :func:`save_part`,
    assembled on :meth:`wait` (on rank 0's upload thread, never the training step); the
    parts are deleted once read. Fails with a one-line error when a part is missing or the
    chunks do not cover a tensor."""

    def __init__(self, folder: Path, world: int) -> None:
        self.folder = folder
        self.world = world

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def wait(self) -> dict[str, torch.Tensor]:
        from mlflow_ema.checkpoint import iter_tensors
        from mlflow_ema.errors import CheckpointError

        full: dict[str, torch.Tensor] = {}
        covered: dict[str, int] = {}
        try:
            for rank in range(self.world):
                weights, index = _part_files(self.folder, rank)
                if not index.is_file():
                    raise CheckpointError(f"{self.folder}: the part of rank {rank} is missing")
                layout = json.loads(index.read_text())
                # one chunk in memory at a time, read like every safetensors file (checkpoint.py)
                for name, chunk in iter_tensors(weights):
                    where = layout.pop(name, None)
                    if where is None:
                        continue
                    if where["shape"] is None:
                        full[name] = chunk
                        continue
                    if name not in full:
                        full[name] = torch.empty(where["shape"], dtype=chunk.dtype)
                    region = tuple(
                        slice(o, o + n) for o, n in zip(where["offsets"], chunk.shape, strict=True)
                    )
                    full[name][region] = chunk
                    covered[name] = covered.get(name, 0) + chunk.numel()
                if layout:
                    raise CheckpointError(
                        f"{weights} lacks {next(iter(layout))!r}, which rank {rank}'s layout names"
                    )
            for name, count in covered.items():
                if count != full[name].numel():
                    raise CheckpointError(
                        f"{self.folder}: the ranks' parts cover {count} of {full[name].numel()} values of {name!r}"
                    )
        finally:
            self.discard()
        return full
