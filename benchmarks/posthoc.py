"""Benchmark: post-hoc EMA reconstruction from snapshots against the time to read them.

The target (from the issue): reconstructing one EMA length from 20 snapshots of a 100 MB
model takes at most 1.5x the time to read the 20 snapshots.

Setup: ``--snapshots`` (20) checkpoint folders written with ``save_checkpoint(...,
kind="posthoc")`` into a temporary folder (removed at the end): half of them power-function
EMA snapshots of ``sigma_rel`` 0.05, half of 0.10, at steps 1000, 2000, ... (10000 by
default), each with its own random weights. The model: ``--params-m`` (25) million fp32
parameters in 147 tensors of transformer shapes (a token embedding, 12 blocks of attention,
MLP and LayerNorm tensors, a final LayerNorm) and one int64 buffer (``position_ids``), so
~100 MB a snapshot, one ``model.safetensors`` each.

Timed, in one process, interleaved over ``--rounds`` rounds (the order rotating each round;
medians reported, since the machine may be shared and noisy):

- ``read``: the floor, a sequential ``readinto`` of every byte of every snapshot's files
  (``model.safetensors`` and ``manifest.json``) into one reusable 8 MiB buffer, warm cache;
- ``read, cold``: the same after evicting the files from the page cache with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` (untimed; the read warms them again);
- ``sha256, 1 thread``: the files through ``hashlib.sha256`` in 1 MiB chunks, as
  ``check_file`` hashes (the verification's work, for reference);
- ``load``: ``load_checkpoint`` of every snapshot (sha256, header checks, tensors), dropped;
- ``posthoc, 1 target``: what ``mlflow-ema posthoc`` does after downloading, for sigma_rel
  0.08 at the last step: ``posthoc_coefficients``, ``check_members`` of every snapshot
  (sha256 of every file, in parallel threads), then ``average(members with the coefficients
  as weights, accumulate=torch.float64, verify=False, signed=True)``; each part timed;
- ``posthoc, 5 targets``: sigma_rel 0.03, 0.05, 0.08, 0.12 and 0.2: the coefficients of
  each, ``check_members`` once, then one ``average`` per target, each output dropped before
  the next (as the CLI does when it writes them). Targets outside the tracked [0.05, 0.10]
  make the library warn; those warnings are silenced here.

Page cache: warm but for ``read, cold``. Every file is read in full by the untimed sanity
pass before the first round; before each timed arm the fraction of the files' pages in the
page cache is measured (``mincore``) and reported. Nothing else is evicted (but some
machines reclaim idle page cache themselves, e.g. with a DAMON pageout scheme: the
residency column shows whether that touched the snapshots). Peak RSS: freed heap memory is returned to
the OS (``malloc_trim``) and the high-water mark reset (``/proc/self/clear_refs``) before
each arm, whose peak above its starting RSS is reported (worst round); files are read with
``preadv`` into buffers, not mapped, so cached file pages are not counted. CPU time
(user + system, all threads) and the CPU pressure (``/proc/pressure/cpu``, the share of time
some task waited for a CPU over the last 10 s) are shown per arm: CPU time near the wall
time of a 2-thread arm, and a high pressure, mean other processes compete for the cores.

Sanity checks, before timing: the coefficients sum to 1 and none is zero; the library's
reconstruction of 0.08 matches an independent fp64 sum of the loaded snapshots (integer
buffers identical); the 5-target run's 0.08 output is identical to the 1-target one. After
the rounds: the files were in the page cache (over 99%) before every warm arm and out of it
(under 5%) before every cold read. With ``--profile``: the prototype's outputs are identical
to the library's.

With ``--profile``, more rounds of their own (see ``profile_arms()``): the library with
torch's default threads and with one; two prototypes written here, not in the library:
``one_pass`` for the 5 targets at once (each snapshot chunk read once and added to 5
accumulators: one read of the snapshots instead of 5, all 5 outputs in memory) and
``hash_alongside`` (the sha256 work in a background thread while the sum runs); and one
target with its verification, as the CLI does it.

Run from the repository root (on 2 quiet cores about 2.5 minutes at the default size and 3
more with ``--profile``; several times longer when other processes compete for the cores,
see the CPU pressure column; ``--quick`` for a smoke run of a few seconds)::

    .venv/bin/python benchmarks/posthoc.py [--snapshots 20] [--params-m 25] [--rounds 5] [--profile]
    .venv/bin/python benchmarks/posthoc.py --quick [--profile]

Exits with status 1 if a sanity check or the target fails (with ``--quick``, only the
sanity checks count).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _common import print_verdicts  # sibling modules: the scripts run from benchmarks/
from average import evict, resident_fraction

from mlflow_ema.checkpoint import WeightsReader, load_checkpoint, save_checkpoint
from mlflow_ema.posthoc_math import posthoc_coefficients, power_beta, sigma_rel_to_gamma
from mlflow_ema.soup import Member, average, check_members, normalized_weights

MIB = 1 << 20
READ_BUFFER = 8 * MIB
LAYERS = 12  # transformer blocks
SEQ = 512  # length of the position_ids buffer
SNAPSHOT_SIGMA_RELS = (0.05, 0.10)
ONE_TARGET = 0.08
FIVE_TARGETS = (0.03, 0.05, 0.08, 0.12, 0.2)
TIME_TARGET = 1.5  # one reconstruction, in times the warm read of the snapshots
PROTOTYPE_CHUNK = 1 << 16  # elements: 256 KiB of fp32 and 512 KiB of fp64 stay in a core's L2
ONE, FIVE = "posthoc, 1 target", "posthoc, 5 targets"


# -- synthetic snapshots --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    sigma_rel: float

    @property
    def label(self) -> str:
        return f"posthoc{self.sigma_rel:g}-step{self.step}"


def layout(params: int) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, mean) of a transformer-shaped state dict of ~``params`` fp32 elements:
    mean 1 for LayerNorm weights, 0 otherwise, and None for the int64 ``position_ids``."""
    d = max(64, int((0.85 * params / (12 * LAYERS)) ** 0.5) // 64 * 64)
    specs: list[tuple[str, tuple[int, ...], float | None]] = [("embed.position_ids", (1, SEQ), None)]
    for i in range(LAYERS):
        p = f"blocks.{i}."
        specs += [
            (p + "norm1.weight", (d,), 1.0),
            (p + "norm1.bias", (d,), 0.0),
            (p + "attn.qkv.weight", (3 * d, d), 0.0),
            (p + "attn.qkv.bias", (3 * d,), 0.0),
            (p + "attn.proj.weight", (d, d), 0.0),
            (p + "attn.proj.bias", (d,), 0.0),
            (p + "norm2.weight", (d,), 1.0),
            (p + "norm2.bias", (d,), 0.0),
            (p + "mlp.fc1.weight", (4 * d, d), 0.0),
            (p + "mlp.fc1.bias", (4 * d,), 0.0),
            (p + "mlp.fc2.weight", (d, 4 * d), 0.0),
            (p + "mlp.fc2.bias", (d,), 0.0),
        ]
    specs += [("norm.weight", (d,), 1.0), ("norm.bias", (d,), 0.0)]
    floats = sum(math.prod(shape) for _, shape, mean in specs if mean is not None)
    vocab = max(16, -(-(params - floats) // d))
    return [("embed.token.weight", (vocab, d), 0.0), *specs]


def describe(specs: list) -> str:
    floats = [math.prod(shape) for _, shape, mean in specs if mean is not None]
    largest = max(specs, key=lambda s: math.prod(s[1]))
    return (
        f"{len(specs)} tensors ({len(floats)} fp32, {len(specs) - len(floats)} int64), {sum(floats):,} fp32 "
        f"elements; largest {largest[0]} {list(largest[1])} ({4 * math.prod(largest[1]) / MIB:.1f} MiB), "
        f"{sum(4 * n < MIB for n in floats)} fp32 tensors under 1 MiB"
    )


def write_snapshots(folder: Path, count: int, params: int) -> list[Snapshot]:
    """``count`` snapshots: ``count / 2`` steps of 1000, 2000, ..., each step one snapshot per
    sigma_rel in SNAPSHOT_SIGMA_RELS, each with its own random weights."""
    specs = layout(params)
    snapshots = []
    for i in range(count):
        step, sigma_rel = 1000 * (i // 2 + 1), SNAPSHOT_SIGMA_RELS[i % 2]
        g = torch.Generator().manual_seed(i)
        state = {}
        for name, shape, mean in specs:
            if mean is None:
                state[name] = torch.arange(math.prod(shape), dtype=torch.int64).view(shape)
            else:
                state[name] = torch.empty(shape).normal_(mean, 0.02, generator=g)
        snapshot = Snapshot(folder / f"posthoc{sigma_rel:g}-step{step}", step, sigma_rel)
        save_checkpoint(snapshot.path, state, kind="posthoc", step=step, ema_updates=step,
                        ema_decay=power_beta(step, sigma_rel_to_gamma(sigma_rel)),
                        init_fingerprint="bench", metadata={"sigma_rel": sigma_rel})  # fmt: skip
        snapshots.append(snapshot)
    return snapshots


def files_of(snapshots: list[Snapshot]) -> list[Path]:
    return [f for s in snapshots for f in sorted(s.path.iterdir())]


# -- measuring one arm ----------------------------------------------------------------


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def trim_heap() -> None:
    """Return the heap's free memory to the OS (glibc ``malloc_trim``), so that an arm's
    allocations show in its RSS rather than reusing pages an earlier arm freed."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``5`` to ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_pressure() -> float:
    """The share (%) of the last 10 s some task waited for a CPU; NaN if unknown."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].removeprefix("avg10="))
    except (OSError, IndexError, ValueError):
        return math.nan


@dataclasses.dataclass
class Arm:
    run: Callable[[dict[str, float]], object]  # gets a dict for the seconds of its parts
    setup: Callable[[], object] | None = None  # untimed, before each run


@dataclasses.dataclass
class Run:
    """One timed arm in one round."""

    seconds: float
    cpu: float  # user + system seconds of the process, all threads
    peak_kib: int  # VmHWM above the RSS at the start (-1: the high-water mark was not reset)
    resident: float  # fraction of the snapshot files' pages in the page cache at the start
    pressure: float  # cpu_pressure() at the start
    parts: dict[str, float] = dataclasses.field(default_factory=dict)


def timed(arm: Arm, files: list[Path]) -> Run:
    parts: dict[str, float] = {}
    if arm.setup is not None:
        arm.setup()
    resident = resident_fraction(files)
    gc.collect()
    trim_heap()
    start_kib = status_kib("VmRSS")
    reset = reset_peak_rss()
    pressure, cpu = cpu_pressure(), os.times()
    start = time.perf_counter()
    arm.run(parts)
    seconds = time.perf_counter() - start
    cpu_end = os.times()
    peak = status_kib("VmHWM") - start_kib if reset else -1
    cpu_seconds = cpu_end.user - cpu.user + cpu_end.system - cpu.system
    return Run(seconds, cpu_seconds, peak, resident, pressure, parts)


def interleave(arms: dict[str, Arm], count: int, files: list[Path]) -> dict[str, list[Run]]:
    """Every arm once per round, the order rotating by one each round."""
    names = list(arms)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for r in range(count):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run = timed(arms[name], files)
            runs[name].append(run)
            print(
                f"  round {r + 1}: {name}: {run.seconds:.3f} s, CPU {run.cpu:.2f} s, "
                f"{100 * run.resident:.0f}% cached, CPU pressure {run.pressure:.0f}%",
                flush=True,
            )
    return runs


# -- the arms -------------------------------------------------------------------------


def read_all(files: list[Path], buffer: memoryview) -> int:
    """Read every byte of ``files`` sequentially; returns the bytes read."""
    total = 0
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total


def hash_all(files: list[Path]) -> None:
    """sha256 of every file in one thread, 1 MiB at a time as ``check_file`` does."""
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(MIB):
                digest.update(chunk)


def load_all(snapshots: list[Snapshot]) -> None:
    for s in snapshots:
        load_checkpoint(s.path)  # verified, parsed and read, then dropped


def coefficients(snapshots: list[Snapshot], target_sigma_rel: float) -> list[float]:
    step = max(s.step for s in snapshots)
    with warnings.catch_warnings():  # 0.03, 0.12, 0.2: outside the tracked range, on purpose
        warnings.simplefilter("ignore")
        values = posthoc_coefficients([s.step for s in snapshots], [s.sigma_rel for s in snapshots],
                                      step, target_sigma_rel)  # fmt: skip
    return [float(c) for c in values]


def members_of(snapshots: list[Snapshot], weights: list[float]) -> list[Member]:
    return [Member(s.path, c, s.label) for s, c in zip(snapshots, weights, strict=True) if c != 0.0]


def weighted_sum(snapshots: list[Snapshot], weights: list[float]) -> dict[str, torch.Tensor]:
    """One reconstruction as ``mlflow_ema.posthoc._combine_all`` computes it."""
    state, _ = average(members_of(snapshots, weights), accumulate=torch.float64, verify=False, signed=True)
    return state


def posthoc(
    snapshots: list[Snapshot], targets: tuple[float, ...], seconds: dict[str, float], *, keep: bool = False
) -> dict[float, dict[str, torch.Tensor]]:
    """What ``mlflow-ema posthoc`` does once the snapshots are local: every target's
    coefficients, the sha256 of every snapshot once, then one fp64 weighted sum per target,
    each output dropped before the next is made (``keep``: returned instead, for the checks).
    The parts' seconds go into ``seconds``."""
    start = time.perf_counter()
    plans = {t: coefficients(snapshots, t) for t in targets}
    planned = time.perf_counter()
    check_members([Member(s.path, 1.0, s.label) for s in snapshots])
    verified = time.perf_counter()
    kept = {}
    for target, weights in plans.items():
        state = weighted_sum(snapshots, weights)
        if keep:
            kept[target] = state
        del state
    seconds.update(
        coefficients=planned - start, verify=verified - planned, sum=time.perf_counter() - verified
    )
    return kept


def main_arms(snapshots: list[Snapshot]) -> dict[str, Arm]:
    files = files_of(snapshots)
    buffer = memoryview(bytearray(READ_BUFFER))
    return {
        "read": Arm(lambda parts: read_all(files, buffer)),
        "read, cold": Arm(lambda parts: read_all(files, buffer), setup=lambda: evict(files)),
        "sha256, 1 thread": Arm(lambda parts: hash_all(files)),
        "load": Arm(lambda parts: load_all(snapshots)),
        ONE: Arm(lambda parts: posthoc(snapshots, (ONE_TARGET,), parts)),
        FIVE: Arm(lambda parts: posthoc(snapshots, FIVE_TARGETS, parts)),
    }


# -- sanity checks --------------------------------------------------------------------


def reference(snapshots: list[Snapshot], weights: list[float]) -> dict[str, torch.Tensor]:
    """The weighted sum computed independently: every snapshot loaded whole, summed in fp64."""
    acc: dict[str, torch.Tensor] = {}
    for s, c in zip(snapshots, weights, strict=True):
        for name, tensor in load_checkpoint(s.path).state_dict.items():
            if not tensor.is_floating_point():
                acc.setdefault(name, tensor)
            elif name in acc:
                acc[name] += c * tensor.double()
            else:
                acc[name] = c * tensor.double()
    return {name: t.float() if t.is_floating_point() else t for name, t in acc.items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, list[str]]:
    """The largest |a - b| over the float tensors, and the names that differ beyond float
    rounding (or at all, for integer tensors, or in keys, dtypes or shapes)."""
    if a.keys() != b.keys():
        return math.inf, sorted(a.keys() ^ b.keys())[:3]
    worst, bad = 0.0, []
    for name in sorted(a):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            bad.append(name)
        elif not x.is_floating_point():
            bad += [] if torch.equal(x, y) else [name]
        else:
            worst = max(worst, (x - y).abs().max().item())
            bad += [] if torch.allclose(x, y, rtol=1e-6, atol=1e-9) else [name]
    return worst, bad


def sanity(snapshots: list[Snapshot]) -> list[tuple[str, bool]]:
    """The checks of the module docstring; also warms the page cache (every file is read)."""
    weights = coefficients(snapshots, ONE_TARGET)
    negative = sum(c < 0 for c in weights)
    lines = [
        (
            f"sanity: the {len(weights)} coefficients of sigma_rel {ONE_TARGET} sum to 1 and none is 0 "
            f"(sum {sum(weights):.15f}, {negative} negative, min {min(weights):+.3f}, max {max(weights):+.3f})",
            abs(sum(weights) - 1) < 1e-9 and all(c != 0.0 for c in weights),
        )
    ]
    one = posthoc(snapshots, (ONE_TARGET,), {}, keep=True)[ONE_TARGET]
    worst, bad = max_difference(one, reference(snapshots, weights))
    lines.append(
        (
            f"sanity: the reconstruction of {ONE_TARGET} matches an fp64 sum of the loaded snapshots "
            f"({len(one)} tensors, max |diff| {worst:.1e}){': ' + ', '.join(bad[:3]) if bad else ''}",
            not bad,
        )
    )
    five = posthoc(snapshots, FIVE_TARGETS, {}, keep=True)
    same = all(torch.equal(one[name], five[ONE_TARGET][name]) for name in one)
    lines.append((f"sanity: the 5-target run's {ONE_TARGET} output is identical to the 1-target one", same))
    return lines


# -- --profile: the weighted sum taken apart ------------------------------------------


def with_threads(threads: int, fn: Callable[[], object]) -> Callable[[dict[str, float]], object]:
    """``fn`` run with torch's intra-op thread count set to ``threads``, then restored."""

    def run(parts: dict[str, float]) -> object:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def one_pass(snapshots: list[Snapshot], weight_lists: list[list[float]]) -> list[dict[str, torch.Tensor]]:
    """A PROTOTYPE, not the library: every weighted sum of ``weight_lists`` at once, the loops
    swapped. Per tensor, per chunk of PROTOTYPE_CHUNK elements, every snapshot's chunk is read
    once and added to one fp64 accumulator chunk per target, small enough to stay in the CPU
    cache; the finished chunk is checked finite and cast into the fp32 output. Memory: the
    outputs and a few chunks (``average``: the output, the tensor read whole from the first
    snapshot and an fp64 copy of it). The same operations in the same order as ``average``,
    so the same bytes; integer tensors are the first snapshot's."""
    weight_lists = [normalized_weights(w, signed=True) for w in weight_lists]
    readers = [WeightsReader(s.path) for s in snapshots]
    buffer = torch.empty(PROTOTYPE_CHUNK, dtype=torch.float32)
    accs = [torch.empty(PROTOTYPE_CHUNK, dtype=torch.float64) for _ in weight_lists]
    outs: list[dict[str, torch.Tensor]] = [{} for _ in weight_lists]
    try:
        for name in readers[0].names:
            dtype, shape = readers[0].spec(name)
            if dtype != "F32":  # the synthetic snapshots hold fp32 and int64 tensors only
                tensor = readers[0].read(name)
                for out in outs:
                    out[name] = tensor
                continue
            tensors = [torch.empty(shape, dtype=torch.float32) for _ in weight_lists]
            numel = math.prod(shape)
            for lo in range(0, numel, PROTOTYPE_CHUNK):
                n = min(PROTOTYPE_CHUNK, numel - lo)
                sum_chunk(readers, name, lo, n, weight_lists, buffer[:n], [acc[:n] for acc in accs])
                for tensor, acc in zip(tensors, accs, strict=True):
                    tensor.view(-1)[lo : lo + n].copy_(acc[:n])
            for out, tensor in zip(outs, tensors, strict=True):
                out[name] = tensor
    finally:
        for r in readers:
            r.close()
    return outs


def sum_chunk(
    readers: list[WeightsReader],
    name: str,
    lo: int,
    n: int,
    weight_lists: list[list[float]],
    buffer: torch.Tensor,
    accs: list[torch.Tensor],
) -> None:
    """Elements ``lo`` to ``lo + n`` of every target's sum of tensor ``name``, into ``accs``."""
    for i, reader in enumerate(readers):
        chunk = reader.read(name, lo, n, out=buffer)
        for acc, weights in zip(accs, weight_lists, strict=True):
            if i == 0:
                acc.copy_(chunk).mul_(weights[0])
            else:
                acc.add_(chunk, alpha=weights[i])
    if not all(np.isfinite(acc.numpy()).all() for acc in accs):
        raise RuntimeError(f"the sum of {name!r} is not finite")


def hash_alongside(snapshots: list[Snapshot], fn: Callable[[], object]) -> None:
    """A PROTOTYPE, not the library: the sha256 of every file (``hash_all``, the work of
    ``check_members``) in one background thread while ``fn`` runs on this one."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing = pool.submit(hash_all, files_of(snapshots))
        fn()
        hashing.result()


def profile_arms(snapshots: list[Snapshot]) -> dict[str, Arm]:
    """The weighted sums of ``posthoc`` on torch's threads and on one, the prototypes, and one
    target with its verification, sequential (as the CLI) or alongside."""
    threads = torch.get_num_threads()
    one = coefficients(snapshots, ONE_TARGET)
    five = [coefficients(snapshots, t) for t in FIVE_TARGETS]

    def lib_one() -> None:
        weighted_sum(snapshots, one)

    def lib_five() -> None:  # each output dropped before the next, as in posthoc()
        for weights in five:
            weighted_sum(snapshots, weights)

    def verify_then_sum() -> None:
        check_members([Member(s.path, 1.0, s.label) for s in snapshots])
        lib_one()

    return {
        f"1 target: library, {threads} threads": Arm(with_threads(threads, lib_one)),
        "1 target: library, 1 thread": Arm(with_threads(1, lib_one)),
        f"5 targets: library, {threads} threads": Arm(with_threads(threads, lib_five)),
        "5 targets: prototype one pass, 1 thread": Arm(with_threads(1, lambda: one_pass(snapshots, five))),
        f"1 target + verify: check_members, then the sum ({threads} threads; the CLI)": Arm(
            with_threads(threads, verify_then_sum)
        ),
        "1 target + verify: prototype, sha256 thread alongside the sum (1 thread)": Arm(
            with_threads(1, lambda: hash_alongside(snapshots, lib_one))
        ),
    }


def check_prototype(snapshots: list[Snapshot]) -> tuple[str, bool]:
    five = [coefficients(snapshots, t) for t in FIVE_TARGETS]
    outs = one_pass(snapshots, five)
    same = all(
        torch.equal(out[name], ref[name])
        for out, weights in zip(outs, five, strict=True)
        for ref in [weighted_sum(snapshots, weights)]
        for name in ref
    )
    return (f"sanity: the prototype's {len(five)} outputs are identical to the library's", same)


# -- report ---------------------------------------------------------------------------


def med(runs: list[Run], get: Callable[[Run], float] = lambda r: r.seconds) -> float:
    return statistics.median(get(r) for r in runs)


def print_arms(runs: dict[str, list[Run]], read: float, total_bytes: int, snapshot_bytes: int) -> None:
    """One row per arm: wall time against the warm read, CPU time, cache, pressure, RSS."""
    print("| arm | median | min - max | / read | GB/s of files | CPU time | cached at start "
          "| CPU pressure | peak RSS above start |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rs in runs.items():
        times = [r.seconds for r in rs]
        peak = max(r.peak_kib for r in rs)
        rss = "-" if peak < 0 else f"{peak / 1024:,.0f} MiB ({peak * 1024 / snapshot_bytes:.2f} snapshots)"
        cached = min(r.resident for r in rs), max(r.resident for r in rs)
        cells = [
            f"{med(rs):.3f} s",
            f"{min(times):.3f} - {max(times):.3f}",
            f"{med(rs) / read:.2f}x",
            f"{total_bytes / med(rs) / 1e9:.2f}",
            f"{med(rs, lambda r: r.cpu):.2f} s",
            " - ".join(dict.fromkeys(f"{100 * c:.0f}%" for c in cached)),
            f"{med(rs, lambda r: r.pressure):.0f}%",
            rss,
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


def print_parts(runs: dict[str, list[Run]], read: float) -> None:
    print("\n### Where the time of a reconstruction goes (medians; / warm read in brackets)\n")
    print("| arm | coefficients | verify (check_members) | weighted sums | per target | total |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n in ((ONE, 1), (FIVE, len(FIVE_TARGETS))):
        cells = [med(runs[name], lambda r, p=p: r.parts[p]) for p in ("coefficients", "verify", "sum")]
        cells += [cells[2] / n, med(runs[name])]
        print(f"| {name} | " + " | ".join(f"{c:.3f} s ({c / read:.2f}x)" for c in cells) + " |")
    verify = med(runs[ONE], lambda r: r.parts["verify"])
    sha = med(runs["sha256, 1 thread"])
    print(
        f"\nsha256 in one thread takes {sha / read:.1f}x the warm read; check_members (threads) "
        f"{verify / read:.1f}x, {sha / verify:.2f}x faster than one thread. The cold read takes "
        f"{med(runs['read, cold']) / read:.1f}x the warm one; one reconstruction "
        f"{med(runs[ONE]) / med(runs['read, cold']):.2f}x the cold read."
    )


def print_profile(runs: dict[str, list[Run]], read: float, total_bytes: int, snapshot_bytes: int) -> None:
    rounds = len(next(iter(runs.values())))
    print(f"\n### --profile: the weighted sums taken apart ({rounds} rounds; no verification unless named)\n")
    print_arms(runs, read, total_bytes, snapshot_bytes)
    print(
        "\n(/ read: against the warm read of the main rounds. 'prototype': this script's loops (one_pass, "
        "hash_alongside), not the library.)"
    )


def target_line(runs: dict[str, list[Run]]) -> tuple[str, bool]:
    one, read = med(runs[ONE]), med(runs["read"])
    return (
        f"target: reconstructing sigma_rel {ONE_TARGET} <= {TIME_TARGET}x reading the snapshots (warm): "
        f"{one:.3f} s / {read:.3f} s = {one / read:.2f}x",
        one <= TIME_TARGET * read,
    )


def cache_line(runs: dict[str, list[Run]]) -> tuple[str, bool]:
    warm = [r.resident for name, rs in runs.items() if name != "read, cold" for r in rs]
    cold = [r.resident for r in runs["read, cold"]]
    return (
        f"sanity: the snapshots were cached before every warm arm (min {100 * min(warm):.1f}%) and "
        f"evicted before every cold read (max {100 * max(cold):.1f}%)",
        min(warm) > 0.99 and max(cold) < 0.05,
    )


# -- main -----------------------------------------------------------------------------


def load_average() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def check_resources(tmp_root: Path, need: int) -> None:
    """Enough disk for the snapshots; a warning if the page cache may not hold them."""
    usage = shutil.disk_usage(tmp_root)
    print(f"{tmp_root}: {usage.free / 2**30:.1f} GiB free, the snapshots take {need / 2**30:.2f} GiB")
    if usage.free < 1.2 * need:
        raise SystemExit(f"not enough disk space in {tmp_root}")
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    if available < 3 * need:
        print(f"warning: {available / 2**30:.1f} GiB available: the snapshots may not stay in the page cache")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=20, help="snapshots, an even number (default 20)")
    parser.add_argument("--params-m", type=float, help="million fp32 parameters a snapshot (default 25)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--profile", action="store_true", help="then take the weighted sums apart")
    parser.add_argument("--quick", action="store_true", help="1M parameters, 1 round: a smoke run")
    parser.add_argument("--tmp", help="where to write the snapshots (default: the system temp folder)")
    args = parser.parse_args()
    args.params = int(1e6 * (args.params_m or (1 if args.quick else 25)))
    args.rounds = 1 if args.quick else args.rounds
    if args.snapshots < 4 or args.snapshots % 2:
        parser.error("--snapshots must be an even number >= 4")
    return args


def measure(snapshots: list[Snapshot], args: argparse.Namespace) -> list[tuple[str, bool]]:
    """The sanity checks, the timed rounds and their tables; returns the verdict lines."""
    files = files_of(snapshots)
    total = sum(f.stat().st_size for f in files)
    per_snapshot = total // len(snapshots)
    lines = sanity(snapshots)  # also reads every file: the cache is warm from here on
    runs = interleave(main_arms(snapshots), args.rounds, files)
    read = med(runs["read"])
    print(
        f"\n### Wall time ({args.rounds} rounds; {len(snapshots)} snapshots, {total / MIB:,.0f} MiB of files)\n"
    )
    print_arms(runs, read, total, per_snapshot)
    print_parts(runs, read)
    lines += [cache_line(runs), target_line(runs)]
    if args.profile:
        print("\n--profile rounds:")
        lines.append(check_prototype(snapshots))
        print_profile(interleave(profile_arms(snapshots), args.rounds, files), read, total, per_snapshot)
    return lines


def main() -> int:
    args = parse_args()
    specs = layout(args.params)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {load_average()}"
    )
    print(f"snapshot: {describe(specs)}")
    tmp_root = Path(args.tmp or tempfile.gettempdir())
    check_resources(
        tmp_root, args.snapshots * sum(4 * math.prod(s) for _, s, mean in specs if mean is not None)
    )
    tmp = Path(tempfile.mkdtemp(prefix="mlflow-ema-bench-posthoc-", dir=tmp_root))
    try:
        start = time.perf_counter()
        snapshots = write_snapshots(tmp, args.snapshots, args.params)
        print(
            f"wrote {len(snapshots)} snapshots (sigma_rel {', '.join(map(str, SNAPSHOT_SIGMA_RELS))} at steps "
            f"1000..{snapshots[-1].step}) in {time.perf_counter() - start:.1f} s; {args.rounds} rounds"
        )
        lines = measure(snapshots, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{load_average()} at the end; removed {tmp}\n")
    return print_verdicts(lines, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
