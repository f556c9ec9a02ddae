"""Averaging checkpoints (SWA, model soups), one tensor at a time.

Tensors are taken in the first member's file order. Each member's part of a tensor is read
from whichever file holds it (``model.safetensors`` or a shard: members may differ in
layout, tensors are matched by name), 256K elements at a time by positional reads into
buffers of the member's own, and summed with their weights, 32K elements at a time, into
one small accumulator (fp32, or fp64 by option) that stays in the CPU cache, then cast into
the output in the inputs' dtype (or ``dtype``). Memory therefore grows with the size of one
checkpoint (the output) and a few MiB a member. Integer tensors (``num_batches_tracked``)
are taken from the first, best-ranked member, never divided.

Before any arithmetic every member is checked: every file's size (and the sha256 of a
sharded member's index; a training state is not read, so not hashed), a sharded member's index
against its shards, the same tensor names, shapes and dtypes, the same init fingerprint
(runs that did not start from the same weights average to garbage;
``allow_different_init`` overrides) and finite weights. The weight files' sha256 are
computed from the bytes the averaging reads (:mod:`mlflow_ema.digests`) and checked before
the average is returned, so nothing made from a corrupt member is written. The same
members and weights always give a byte-identical output.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mlflow_ema.checkpoint import (
    _DTYPES,
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_FILE,
    Manifest,
    WeightsReader,
    _finite,
    check_digest,
    check_file,
    check_size,
    parallel_map,
    read_manifest,
    save_checkpoint,
    weight_files,
)
from mlflow_ema.digests import MemberReads
from mlflow_ema.errors import AveragingError, CheckpointError

# Elements summed at a time: 256 KiB of fp64 accumulator stays in the CPU cache, and torch
# runs an op this small on one thread (two threads stall each other on a busy machine).
_SUM_CHUNK = 1 << 15
# Chunks read from each member at a time: fewer, larger reads (and hand-offs to the threads
# that hash them) for the same small accumulator.
_SUMS_PER_READ = 8


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


def _as_member(member: Member, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, with a checkpoint error prefixed by the member's name; a
    labelled member was downloaded to a temporary folder: its errors name the file, not the
    folder."""
    try:
        return fn(*args, **kwargs)
    except CheckpointError as e:
        text = str(e).replace(f"{member.path}{os.sep}", "") if member.label else str(e)
        raise type(e)(f"{member.name}: {text}") from None


def check_members(
    members: Sequence[Member], *, allow_different_init: bool = False, verify: bool = True
) -> list[Manifest]:
    """Manifests of the members, after the checks the module docstring lists (not the
    tensor layouts, which :func:`average` checks from the files)."""
    if not members:
        raise AveragingError("nothing to average: no checkpoints were selected")
    manifests = [_as_member(m, read_manifest, m.path) for m in members]
    if verify:  # every file of every member, shards included, in parallel; errors in rank order
        _check_files(members, manifests, lambda manifest, name: True)
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


def normalized_weights(weights: Sequence[float], *, signed: bool = False) -> list[float]:
    """The weights divided by their sum. ``signed``: some may be negative (post-hoc EMA's
    coefficients); the sum must still be positive."""
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) or (w < 0 and not signed) for w in values) or sum(values) <= 0:
        what = "finite, with a positive sum" if signed else "finite, non-negative and not all zero"
        raise AveragingError(f"weights must be {what}, got {values}")
    total = sum(values)
    return [w / total for w in values]


def average(
    members: Sequence[Member],
    *,
    accumulate: torch.dtype = torch.float32,
    dtype: torch.dtype | None = None,
    allow_different_init: bool = False,
    verify: bool = True,
    signed: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[Manifest]]:
    """The weighted average of the members' tensors (weights normalized to sum to 1; with
    ``signed``, some may be negative), keyed as their state dicts, with tied weights
    restored from the first manifest's aliases; and the members' manifests.
    ``progress(done, total)`` is called per tensor. With ``verify``, each weight file's
    sha256 is computed from the bytes the averaging reads (:mod:`mlflow_ema.digests`) and
    checked before the average is returned; every other file is checked first."""
    manifests = check_members(members, allow_different_init=allow_different_init, verify=False)
    if verify:
        _check_before_reading(members, manifests)
    weights = normalized_weights([m.weight for m in members], signed=signed)
    try:
        out = _stream(members, manifests, weights, accumulate, dtype, verify, progress)
    except (CheckpointError, AveragingError):
        if verify:  # a corrupt file reads as garbage: its checksum is the error to report
            _check_files(members, manifests, lambda manifest, name: name in weight_files(manifest))
        raise
    for alias, target in manifests[0].aliases.items():
        out[alias] = out[target]
    return out, manifests


def _check_before_reading(members: Sequence[Member], manifests: list[Manifest]) -> None:
    """Every file's size, and the sha256 of a sharded member's index (read whole before the
    weights), in parallel. A training state is not read here, so not hashed."""
    jobs = [(m, name, expected) for m, manifest in zip(members, manifests, strict=True)
            for name, expected in manifest.files.items()]  # fmt: skip
    parallel_map(lambda job: _as_member(job[0], check_size, job[0].path / job[1], job[2]), jobs)
    _check_files(members, manifests, lambda manifest, name: name == INDEX_FILE)


def _check_files(
    members: Sequence[Member], manifests: list[Manifest], wanted: Callable[[Manifest, str], bool]
) -> None:
    """The sha256 of the members' files that ``wanted(manifest, name)`` names, in parallel."""
    jobs = [(m, name, expected) for m, manifest in zip(members, manifests, strict=True)
            for name, expected in manifest.files.items() if wanted(manifest, name)]  # fmt: skip
    parallel_map(lambda job: _as_member(job[0], check_file, job[0].path / job[1], job[2]), jobs)


def _stream(
    members: Sequence[Member],
    manifests: list[Manifest],
    weights: list[float],
    accumulate: torch.dtype,
    dtype: torch.dtype | None,
    verify: bool,
    progress: Callable[[int, int], None] | None,
) -> dict[str, torch.Tensor]:
    """The averaged tensors, read in the first member's file order (sequential reads), then
    the weight files' digests checked against the manifests."""
    readers: list[WeightsReader] = []
    reads: MemberReads | None = None
    try:
        for m, manifest in zip(members, manifests, strict=True):
            readers.append(_as_member(m, WeightsReader, m.path, manifest, label=m.name))
        names = _check_layouts(readers, manifests)
        reads = MemberReads(readers, verify=verify, buffer_bytes=_SUM_CHUNK * _SUMS_PER_READ * 8)
        out: dict[str, torch.Tensor] = {}
        for done, name in enumerate(readers[0].in_file_order(), 1):
            out[name] = _average_one(name, reads, weights, accumulate, dtype)
            if progress is not None:
                progress(done, len(names))
        if verify:
            reads.finish()
            jobs = [(j, file, manifest.files[file]) for j, manifest in enumerate(manifests)
                    for file in weight_files(manifest)]  # fmt: skip
            parallel_map(lambda job: _check_digest(members[job[0]], reads, *job), jobs)
    finally:
        for r in readers:
            r.close()
        if reads is not None:
            reads.close()
    return {name: out[name] for name in names}


def _check_digest(member: Member, reads: MemberReads, index: int, file: str, expected: dict) -> None:
    _as_member(member, check_digest, member.path / file, expected, reads.hexdigest(index, file))


_DTYPES_BY_NAME = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
}  # fmt: skip


def average_checkpoints(
    paths: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    weights: Sequence[float] | None = None,
    *,
    accumulate: str | torch.dtype = "float32",
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
    allow_different_init: bool = False,
    labels: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted average of local checkpoint folders, without MLflow; written to
    ``output`` as a checkpoint (kind ``soup``) when given. Returns the averaged state dict.

    ``weights`` (default: equal) are divided by their sum and may be negative (post-hoc
    EMA's coefficients), as long as the sum is positive. Tensors are summed in
    ``accumulate`` (``"float32"`` or ``"float64"``) and written in the inputs' dtype unless
    ``dtype``. Every member is checked: tensor names, shapes and dtypes, init fingerprint
    unless ``allow_different_init``, finite weights before any arithmetic, and the sha256 of
    every file, computed from the bytes the averaging reads (one pass over each member) and
    checked before anything is returned or written. ``output`` is written into a temporary
    folder beside it, hashed as it is written, and renamed into place when complete; an
    existing ``output`` is refused before any work. ``labels`` name the checkpoints in error
    messages (default: their paths); ``progress(done, total)`` is called per tensor.
    """
    paths = [Path(p) for p in paths]
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    labels = [""] * len(paths) if labels is None else [str(label) for label in labels]
    if len(weights) != len(paths) or len(labels) != len(paths):
        what = f"{len(weights)} weights" if len(weights) != len(paths) else f"{len(labels)} labels"
        raise AveragingError(f"{what} for {len(paths)} checkpoints: give one per checkpoint")
    if output is not None and (Path(output).exists() or Path(output).is_symlink()):
        raise AveragingError(f"output {output} already exists: give a new folder (nothing is overwritten)")
    members = [Member(p, w, label) for p, w, label in zip(paths, weights, labels, strict=True)]
    state, manifests = average(members, accumulate=_dtype(accumulate, "accumulate"),
                               dtype=_dtype(dtype, "dtype") if dtype is not None else None,
                               allow_different_init=allow_different_init, signed=True,
                               progress=progress)  # fmt: skip
    if output is not None:
        fingerprints = {m.init_fingerprint for m in manifests}
        metadata = {"members": [str(p) for p in paths], "weights": normalized_weights(weights, signed=True)}
        save_checkpoint(Path(output), state, kind="soup", metadata=metadata, max_shard_size=max_shard_size,
                        init_fingerprint=fingerprints.pop() if len(fingerprints) == 1 else None)  # fmt: skip
    return state


def _dtype(value: str | torch.dtype, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if value in _DTYPES_BY_NAME:
        return _DTYPES_BY_NAME[value]
    raise AveragingError(f"{what} must be one of {', '.join(_DTYPES_BY_NAME)}, got {value!r}")


def _check_layouts(readers: list[WeightsReader], manifests: list[Manifest]) -> list[str]:
    """The tensor names, once every member has the first's names, dtypes, shapes and aliases
    (by name: one member sharded and another not is fine)."""
    first = readers[0]
    names = first.names
    complex_names = [name for name in names if first.spec(name)[0] == "C64"]
    if complex_names:  # readable since load_checkpoint reads every dtype safetensors does
        raise AveragingError(f"{first.label}: {complex_names[0]!r} is complex (C64), which is not averaged")
    for r, manifest in zip(readers[1:], manifests[1:], strict=True):
        missing = sorted(set(names) - set(r.names))
        extra = sorted(set(r.names) - set(names))
        if missing or extra:
            key = (missing or extra)[0]
            what = "lacks" if missing else "has an extra tensor"
            raise AveragingError(
                f"{r.label} {what} {key!r} ({len(missing)} missing, {len(extra)} extra vs {first.label})"
            )
        for name in names:
            if r.spec(name) != first.spec(name):
                (d1, s1), (d2, s2) = first.spec(name), r.spec(name)
                raise AveragingError(
                    f"{r.label}: {name!r} is {d2} {list(s2)}, {first.label} has {d1} {list(s1)}"
                )
        if manifest.aliases != manifests[0].aliases:
            raise AveragingError(f"{r.label} ties other weights than {first.label}")
    return names


def _average_one(
    name: str,
    reads: MemberReads,
    weights: list[float],
    accumulate: torch.dtype,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """One tensor's weighted sum, chunk by chunk: every member's chunk is added into one
    small accumulator that stays in the CPU cache (and on one thread: a chunk is below
    torch's parallel grain), then cast into the output. Element by element the same
    operations, in the same order, as summing whole tensors member by member."""
    first = reads.readers[0]
    code, shape = first.spec(name)
    kind = _DTYPES.get(code)
    if kind is None or not kind.is_floating_point:  # integer buffers: the best-ranked member's,
        return first.read(name)  # never divided (an unreadable dtype: read() says so)
    numel = math.prod(shape)
    out = torch.empty(numel, dtype=dtype or kind)
    acc = torch.empty(min(_SUM_CHUNK, numel), dtype=accumulate)
    step = _SUM_CHUNK * _SUMS_PER_READ
    for lo in range(0, numel, step):
        n = min(step, numel - lo)
        parts = reads.read(name, lo, n, kind)
        for sub in range(0, n, _SUM_CHUNK):
            m = min(_SUM_CHUNK, n - sub)
            chunk = acc[:m]
            chunk.copy_(parts[0][sub : sub + m]).mul_(weights[0])
            for part, weight in zip(parts[1:], weights[1:], strict=True):
                chunk.add_(part[sub : sub + m], alpha=weight)
            if not _finite(chunk):
                raise AveragingError(f"the average of {name!r} is not finite")
            out[lo + sub : lo + sub + m].copy_(chunk)
    return out.view(shape)


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
    """Name, safetensors dtype and shape of each tensor in a checkpoint (either layout), from
    the headers alone."""
    with WeightsReader(checkpoint) as r:
        return [{"name": n, "dtype": r.spec(n)[0], "shape": list(r.spec(n)[1])} for n in r.names]
