"""Averaging checkpoints (SWA, model soups), one tensor at a time.

For each tensor name the members' tensors are read from their ``model.safetensors``
(positional reads into one reusable buffer) and summed into one accumulator (fp32, or
fp64 by option) with their weights, then cast back to the inputs' dtype (or ``dtype``). Memory therefore grows with the size of one
checkpoint (the output), not with the number of members. Integer tensors
(``num_batches_tracked``) are taken from the first, best-ranked member, never divided.

Before any arithmetic every member is checked: sha256 against its manifest, the same
tensor names, shapes and dtypes, the same init fingerprint (runs that did not start
from the same weights average to garbage; ``allow_different_init`` overrides) and
finite weights. The same members and weights always give a byte-identical output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mlflow_ema.checkpoint import WEIGHTS_FILE, Manifest, _finite, read_manifest, verify_checkpoint
from mlflow_ema.errors import CheckpointError, MlflowEmaError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


_CHUNK = 1 << 22  # bytes read per member at a time


class AveragingError(MlflowEmaError):
    """The members cannot be averaged: mismatched tensors, other initialization, NaN/inf..."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One checkpoint to average: a local checkpoint folder, its weight, and a label
    (e.g. ``run <id> step <n>``) that error messages name."""

    path: Path
    weight: float = 1.0
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or str(self.path)


class _SafetensorsFile:
    """A safetensors file read tensor by tensor with positional reads into a buffer the
    caller owns. (Memory-mapping was measured to keep touched file pages resident, up to
    3x a checkpoint with 8 members of small tensors, even after madvise.)"""

    def __init__(self, file: Path, label: str) -> None:
        self.label = label
        try:
            self._fd = os.open(file, os.O_RDONLY)
            (size,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, size, 8))
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"{label}: {file} is not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self._base = 8 + size
        self.entries = header  # name -> {"dtype", "shape", "data_offsets"}

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        entry = self.entries[name]
        return entry["dtype"], tuple(entry["shape"])

    def read(
        self, name: str, first: int = 0, count: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements ``first`` to ``first + count`` of the flattened tensor (all of it, in its
        shape, by default), read into ``out`` when given."""
        entry = self.entries[name]
        dtype = _DTYPES[entry["dtype"]]
        size = torch.empty((), dtype=dtype).element_size()
        start, end = entry["data_offsets"]
        whole = count is None
        count = (end - start) // size - first if whole else count
        out = torch.empty(count, dtype=dtype) if out is None else out
        view = memoryview(out.view(torch.uint8).numpy()) if count else memoryview(b"")
        done, offset = 0, self._base + start + first * size
        while done < count * size:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.label}: {name!r} ends early: the file is truncated")
            done += n
        return out.view(entry["shape"]) if whole else out

    def close(self) -> None:
        os.close(self._fd)


def check_members(
    members: Sequence[Member], *, allow_different_init: bool = False, verify: bool = True
) -> list[Manifest]:
    """Manifests of the members, after the checks the module docstring lists (not the
    tensor layouts, which :func:`average` checks from the files)."""
    if not members:
        raise AveragingError("nothing to average: no checkpoints were selected")

    def manifest_of(member: Member) -> Manifest:
        try:
            return verify_checkpoint(member.path) if verify else read_manifest(member.path)
        except CheckpointError as e:
            # a labelled member was downloaded to a temporary folder: name the file, not the folder
            text = str(e).replace(f"{member.path}{os.sep}", "") if member.label else str(e)
            raise type(e)(f"{member.name}: {text}") from None

    # sha256 is the slow part (~1.2 GB/s a core) and hashlib releases the GIL: hash in parallel
    with ThreadPoolExecutor(max_workers=max(1, min(len(members), os.cpu_count() or 1))) as pool:
        manifests = list(pool.map(manifest_of, members))  # errors surface in rank order
    for member, manifest in zip(members, manifests, strict=True):
        if not manifest.all_finite:
            raise AveragingError(f"{member.name} has NaN or infinite weights")
    if not allow_different_init:
        first = manifests[0].init_fingerprint
        for member, manifest in zip(members[1:], manifests[1:], strict=True):
            if manifest.init_fingerprint != first:
                raise AveragingError(
                    f"{member.name} did not start from the same weights as {members[0].name} "
                    "(init fingerprints differ); averaging unrelated initializations gives garbage "
                    "(--allow-different-init to do it anyway)"
                )
    return manifests


def normalized_weights(weights: Sequence[float]) -> list[float]:
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
        raise AveragingError(f"weights must be finite, non-negative and not all zero, got {values}")
    total = sum(values)
    return [w / total for w in values]


def average(
    members: Sequence[Member],
    *,
    accumulate: torch.dtype = torch.float32,
    dtype: torch.dtype | None = None,
    allow_different_init: bool = False,
    verify: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[Manifest]]:
    """The weighted average of the members' tensors (weights normalized to sum to 1),
    keyed as their state dicts, with tied weights restored from the first manifest's
    aliases; and the members' manifests. ``progress(done, total)`` is called per tensor."""
    manifests = check_members(members, allow_different_init=allow_different_init, verify=verify)
    weights = normalized_weights([m.weight for m in members])
    files = [_SafetensorsFile(m.path / WEIGHTS_FILE, m.name) for m in members]
    try:
        names = _check_layouts(files, manifests)
        out: dict[str, torch.Tensor] = {}
        for done, name in enumerate(names, 1):
            out[name] = _average_one(name, files, weights, accumulate, dtype)
            if progress is not None:
                progress(done, len(names))
    finally:
        for f in files:
            f.close()
    for alias, target in manifests[0].aliases.items():
        out[alias] = out[target]
    return out, manifests


def _check_layouts(files: list[_SafetensorsFile], manifests: list[Manifest]) -> list[str]:
    first = files[0]
    for f, manifest in zip(files[1:], manifests[1:], strict=True):
        missing = sorted(set(first.entries) - set(f.entries))
        extra = sorted(set(f.entries) - set(first.entries))
        if missing or extra:
            key = (missing or extra)[0]
            what = "lacks" if missing else "has an extra tensor"
            raise AveragingError(
                f"{f.label} {what} {key!r} ({len(missing)} missing, {len(extra)} extra vs {first.label})"
            )
        for name in first.entries:
            if f.spec(name) != first.spec(name):
                (d1, s1), (d2, s2) = first.spec(name), f.spec(name)
                raise AveragingError(
                    f"{f.label}: {name!r} is {d2} {list(s2)}, {first.label} has {d1} {list(s1)}"
                )
        if manifest.aliases != manifests[0].aliases:
            raise AveragingError(f"{f.label} ties other weights than {first.label}")
    return sorted(first.entries)


def _average_one(
    name: str,
    files: list[_SafetensorsFile],
    weights: list[float],
    accumulate: torch.dtype,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    first = files[0].read(name)
    if not first.is_floating_point():  # integer buffers: the best-ranked member's, never divided
        return first
    acc = first.to(accumulate).mul_(weights[0])  # fp32 inputs: first itself becomes the sum
    flat = acc.view(-1)
    step = max(1, _CHUNK // first.element_size())
    buffer = torch.empty(min(step, flat.numel()), dtype=first.dtype)
    for f, w in zip(files[1:], weights[1:], strict=True):
        for lo in range(0, flat.numel(), step):  # in chunks: memory stays ~ the output
            n = min(step, flat.numel() - lo)
            flat[lo : lo + n].add_(f.read(name, lo, n, out=buffer[:n]), alpha=w)
    if not all(_finite(chunk) for chunk in flat.split(step)):
        raise AveragingError(f"the average of {name!r} is not finite")
    return acc.to(dtype or first.dtype)


def greedy_soup(
    members: Sequence[Member],
    score: Callable[[dict[str, torch.Tensor]], float],
    *,
    mode: str = "max",
    on_trial: Callable[[Member, float, bool], None] | None = None,
    **kwargs,
) -> tuple[list[Member], dict[str, torch.Tensor], float]:
    """Wortsman et al. 2022: take the members in rank order, keep each one only if the
    held-out score of the uniform soup with it is at least as good as without.
    Returns the ingredients kept, their average and its score."""
    better = (lambda a, b: a >= b) if mode == "max" else (lambda a, b: a <= b)
    check_members(members, allow_different_init=kwargs.get("allow_different_init", False))
    kwargs["verify"] = False  # verified once above, not on every trial
    kept = [dataclasses.replace(members[0], weight=1.0)]
    soup, _ = average(kept, **kwargs)
    best = score(soup)
    if on_trial:
        on_trial(members[0], best, True)
    for member in members[1:]:
        trial_members = [*kept, dataclasses.replace(member, weight=1.0)]
        trial, _ = average(trial_members, **kwargs)
        value = score(trial)
        keep = better(value, best)
        if on_trial:
            on_trial(member, value, keep)
        if keep:
            kept, soup, best = trial_members, trial, value
    return kept, soup, best


def tensor_specs(checkpoint: Path) -> list[dict]:
    """Name, safetensors dtype and shape of each tensor in a checkpoint, from the header alone."""
    f = _SafetensorsFile(Path(checkpoint) / WEIGHTS_FILE, str(checkpoint))
    try:
        return [{"name": n, "dtype": f.spec(n)[0], "shape": list(f.spec(n)[1])} for n in sorted(f.entries)]
    finally:
        f.close()
