"""Benchmark: averaging k checkpoints with ``mlflow_ema.soup.average``: time and peak memory.

k synthetic checkpoints of ``--size-mb`` MiB each (default 200; fp32 tensors of transformer
shapes: an embedding, 24 blocks of attention, MLP, LayerNorm and BatchNorm tensors, 413 tensors
in all, 25 of them int64 buffers: ``num_batches_tracked`` and ``position_ids``; or with
``--layout convnet`` 3002 tensors, 500 blocks of a 3x3 convolution of a few hundred KiB and a
BatchNorm), written with ``save_checkpoint(..., kind="ema", init_fingerprint="same")`` into a
temporary folder, are averaged for k = 2 and k = 8 by:

- ``(1) soup.average``: ``mlflow_ema.soup.average(members)`` then ``save_checkpoint`` of the
  result, the path ``mlflow-ema average`` takes. ``average`` verifies the sha256 of every member
  first (a full read of each file, in parallel threads), then sums one tensor at a time, reading
  each member's tensor in 4 MiB chunks straight into the accumulator (an earlier version
  memory-mapped the files and released pages with ``madvise``; this benchmark showed mapped
  pages staying resident and growing with k);
- ``(2) load all``: the "apply_swa" approach of many repositories: ``load_checkpoint`` of every
  member (which verifies the sha256 too) kept in a list, then ``torch.stack(...).mean(0)`` key
  by key (integer buffers from the first member), then ``save_checkpoint``;
- ``(3) read k files``: the floor: a sequential ``readinto`` of every byte of the k checkpoint
  folders into one reusable 8 MiB buffer. And, for reference, ``sha256 k files``: the same read
  through hashlib as ``verify_checkpoint`` does (1 MiB chunks), the cost of the verification.

Each run of (1) and (2) is a fresh subprocess (the parent imports no torch and stays small:
a child's ``ru_maxrss`` starts at its parent's peak RSS, which it inherits through exec). The
child imports everything, reads ``VmRSS`` from ``/proc/self/status`` as its baseline, does the
work, and reports its peak RSS above the baseline as ``ru_maxrss`` minus that baseline, in
multiples of one checkpoint file's size. ``VmHWM`` (the same high-water mark) is read after each
phase, so the tables also show where the peak is reached, and for (1) the file pages still
mapped when averaging ends (``RssFile`` above the baseline just before the files are closed;
about 0 now that nothing is mapped). Times are measured inside the child
(imports excluded); (1) is split into verify (sha256 of the members), average (the rest of
``average()``) and save (``save_checkpoint``: write, sha256, NaN/inf check, fsync), by wrapping
those functions with timers, which does not change what they do.

Warm page cache: every file is read once before, and all members stay in the cache (the script
warns if the available memory may not hold them). Runs are interleaved in ``--repeats`` rounds (the order of (1) and (2)
rotating) and the median time is reported, since the machine may be shared and noisy. Then, for
information, a cold-cache pass: each member file's pages are evicted with
``posix_fadvise(POSIX_FADV_DONTNEED)`` (targeted; ``echo 3 > /proc/sys/vm/drop_caches`` drops
the whole machine's cache), eviction is confirmed with ``mincore``, and the read and (1) are
timed once each.

With ``--shard-mb N`` the members are written sharded at N MiB (``max_shard_size``: the Hugging
Face layout, e.g. 200 MiB as 4 shards of ~50 MiB and one of the 37 MiB embedding), and (1) and
(2) write their outputs with the same limit; "one checkpoint" is then the sum of the shards.
Last, a fresh process builds one checkpoint's state dict in place, resets its high-water mark
(``/proc/self/clear_refs``) and writes it with ``save_checkpoint``, as one file and, with
``--shard-mb``, sharded: the peak RSS beyond the state dict is what writing costs.

Targets: peak RSS above baseline of (1) at most 1.5x one checkpoint for k = 2 and k = 8; wall
time of (1) at most 1.5x the time to read the k files (warm cache); with ``--shard-mb``, writing
a sharded checkpoint needs at most one shard of memory beyond its state dict. Sanity checks: (1)
and (2) give the same tensors, (1) gives byte-identical files on every run, and with
``--shard-mb`` every output is sharded.

Run from the repository root (about 2 minutes; ``--quick`` for a short smoke run)::

    .venv/bin/python benchmarks/average.py [--size-mb 200] [--repeats 3] [--layout convnet] [--quick]
    .venv/bin/python benchmarks/average.py --shard-mb 50     # the same with sharded checkpoints

Exits with status 1 if a sanity check or a target fails (with ``--quick``, only the sanity checks).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import json
import math
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import print_verdicts  # a sibling module: the scripts run from benchmarks/

# No torch at module level: the parent must stay small (see the docstring).

SOUP = "(1) soup.average"
NAIVE = "(2) load all"
VARIANTS = (SOUP, NAIVE)
LAYERS = 24  # transformer blocks
SEQ = 512
CONV_BLOCKS = 500  # convnet blocks
INTS = ("arange", "steps")  # the inits of int64 buffers
MIB = 1 << 20
READ_BUFFER = 8 * MIB
RSS_TARGET = 1.5  # peak RSS of (1) above baseline, in checkpoints
TIME_TARGET = 1.5  # wall time of (1), in times the warm read of the k files


# -- synthetic checkpoints ----------------------------------------------------------


def layout(size_bytes: int, kind: str = "transformer") -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of a state dict of at least ``size_bytes``: fp32 tensors but for the
    int64 buffers (``num_batches_tracked``, ``position_ids``). ``transformer``: an embedding and
    24 blocks (413 tensors); ``convnet``: 500 blocks of a 3x3 convolution and a BatchNorm, so
    3002 tensors of a few hundred KiB each, and a classifier head."""
    target = size_bytes // 4  # fp32 elements
    specs: list[tuple[str, tuple[int, ...], str]] = []
    if kind == "convnet":
        c = max(16, int((0.9 * target / (9 * CONV_BLOCKS)) ** 0.5))
        for i in range(CONV_BLOCKS):
            p = f"layers.{i:03d}."
            specs += [
                (p + "conv.weight", (c, c, 3, 3), "randn"),
                (p + "bn.weight", (c,), "ones"),
                (p + "bn.bias", (c,), "randn"),
                (p + "bn.running_mean", (c,), "randn"),
                (p + "bn.running_var", (c,), "var"),
                (p + "bn.num_batches_tracked", (), "steps"),
            ]
        floats = sum(math.prod(s) for _, s, init in specs if init not in INTS)
        return [
            *specs,
            ("head.weight", (max(10, -(-(target - floats) // c)), c), "randn"),
            ("head.bias", (c,), "randn"),
        ]
    d = max(64, int((0.85 * target / (12 * LAYERS)) ** 0.5) // 64 * 64)
    specs += [("embeddings.position_ids", (1, SEQ), "arange"), ("embeddings.position", (1, SEQ, d), "randn")]
    for i in range(LAYERS):
        p = f"blocks.{i}."
        specs += [
            (p + "attn.qkv.weight", (3 * d, d), "randn"),
            (p + "attn.qkv.bias", (3 * d,), "randn"),
            (p + "attn.proj.weight", (d, d), "randn"),
            (p + "attn.proj.bias", (d,), "randn"),
            (p + "norm1.weight", (d,), "ones"),
            (p + "norm1.bias", (d,), "randn"),
            (p + "mlp.fc1.weight", (4 * d, d), "randn"),
            (p + "mlp.fc1.bias", (4 * d,), "randn"),
            (p + "mlp.fc2.weight", (d, 4 * d), "randn"),
            (p + "mlp.fc2.bias", (d,), "randn"),
            (p + "norm2.weight", (d,), "ones"),
            (p + "norm2.bias", (d,), "randn"),
            (p + "bn.weight", (d,), "ones"),
            (p + "bn.bias", (d,), "randn"),
            (p + "bn.running_mean", (d,), "randn"),
            (p + "bn.running_var", (d,), "var"),
            (p + "bn.num_batches_tracked", (), "steps"),
        ]
    specs += [("norm.weight", (d,), "ones"), ("norm.bias", (d,), "randn")]
    floats = sum(math.prod(s) for _, s, init in specs if init not in INTS)
    vocab = max(1000, -(-(target - floats) // d))
    return [("embeddings.token.weight", (vocab, d), "randn"), *specs]


def describe(specs: list[tuple[str, tuple[int, ...], str]]) -> str:
    ints = sum(init in INTS for _, _, init in specs)
    sizes = sorted(4 * math.prod(s) for _, s, init in specs if init not in INTS)
    biggest = max(specs, key=lambda s: math.prod(s[1]))
    return (
        f"{len(specs)} tensors ({len(specs) - ints} fp32, {ints} int64 buffers), {sum(sizes) // 4:,} fp32 "
        f"elements; largest {biggest[0]} {list(biggest[1])} ({4 * math.prod(biggest[1]) / MIB:.1f} MiB), "
        f"{sum(n < MIB for n in sizes)} fp32 tensors under 1 MiB"
    )


def child_generate(spec: dict) -> dict:
    import torch

    from mlflow_ema.checkpoint import save_checkpoint

    specs = layout(spec["size_bytes"], spec["layout"])
    paths = []
    for i in range(spec["k"]):
        g = torch.Generator().manual_seed(i)
        state = {}
        for name, shape, init in specs:
            if init == "arange":
                state[name] = torch.arange(math.prod(shape), dtype=torch.int64).view(shape)
            elif init == "steps":
                state[name] = torch.tensor(1000 * (i + 1), dtype=torch.int64)
            elif init == "ones":
                state[name] = 1 + 0.01 * torch.randn(shape, generator=g)
            elif init == "var":
                state[name] = 0.5 + torch.rand(shape, generator=g)
            else:
                state[name] = 0.02 * torch.randn(shape, generator=g)
        path = Path(spec["dir"]) / f"member-{i}"
        save_checkpoint(path, state, kind="ema", step=1000 * (i + 1), init_fingerprint="same",
                        max_shard_size=spec["max_shard_size"])  # fmt: skip
        paths.append(str(path))
        del state
    return {"paths": paths}


# -- the measured variants (each in a fresh subprocess) -------------------------------


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class Clock:
    """Accumulated seconds per key, from wrapped functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, int] = {}  # VmHWM (KiB) after the last call of a wrapped function

    def wrap(self, key: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
                self.peaks[key] = status_kib("VmHWM")

        return timed


def child_measure(spec: dict) -> dict:
    import gc

    import torch

    import mlflow_ema.checkpoint as ckpt
    import mlflow_ema.soup as soup

    members = [Path(p) for p in spec["members"]]
    out = Path(spec["output"])
    clock = Clock()
    torch.ones(1 << 16).add_(1)  # start torch's thread pool before the baseline
    gc.collect()
    baseline = status_kib("VmRSS")
    peaks: dict[str, int] = {}
    mapped: dict[str, int] = {}
    start = time.perf_counter()
    if spec["variant"] == SOUP:
        soup.check_members = clock.wrap("verify", soup.check_members)
        # file pages still mapped when averaging ends (none: the files are read, not mapped)
        file_baseline, close = status_kib("RssFile"), ckpt.WeightsReader.close

        def close_and_measure(self) -> None:
            mapped.setdefault("kib", status_kib("RssFile") - file_baseline)
            close(self)

        ckpt.WeightsReader.close = close_and_measure
        state, manifests = soup.average([soup.Member(p, 1.0, f"member {i}") for i, p in enumerate(members)])
        averaged = time.perf_counter()
        peaks["verify"] = clock.peaks["verify"]
        peaks["average"] = status_kib("VmHWM")
        rss_after_average = status_kib("VmRSS")
        # the save's parts; wrapped only now since the verification calls _file_digest too
        ckpt.save_file = clock.wrap("write", ckpt.save_file)
        ckpt._file_digest = clock.wrap("sha256", ckpt._file_digest)
        ckpt._finite = clock.wrap("finite", ckpt._finite)
        ckpt._fsync = clock.wrap("fsync", ckpt._fsync)
        manifest = ckpt.save_checkpoint(
            out, state, kind="soup", init_fingerprint=manifests[0].init_fingerprint,
            max_shard_size=spec["max_shard_size"],
        )  # fmt: skip
        end = time.perf_counter()
        verify = clock.seconds["verify"]
        seconds = {
            "verify": verify,
            "average": averaged - start - verify,
            "save": end - averaged,
            **{f"save {k}": clock.seconds[k] for k in ("write", "sha256", "finite", "fsync")},
        }
    else:
        # load_checkpoint verifies through parallel_map (the sha256 of its files), nothing else does
        ckpt.parallel_map = clock.wrap("verify", ckpt.parallel_map)
        loaded = [ckpt.load_checkpoint(p) for p in members]
        t_load = time.perf_counter()
        peaks["verify"] = clock.peaks["verify"]
        peaks["load"] = status_kib("VmHWM")
        states = [c.state_dict for c in loaded]
        state = {}
        for key, first in states[0].items():
            if first.is_floating_point():
                state[key] = torch.stack([s[key] for s in states]).mean(0)
            else:
                state[key] = first.clone()
        averaged = time.perf_counter()
        peaks["average"] = status_kib("VmHWM")
        rss_after_average = status_kib("VmRSS")
        manifest = ckpt.save_checkpoint(
            out, state, kind="soup", init_fingerprint=loaded[0].manifest.init_fingerprint,
            max_shard_size=spec["max_shard_size"],
        )  # fmt: skip
        end = time.perf_counter()
        seconds = {
            "verify": clock.seconds["verify"],
            "load": t_load - start - clock.seconds["verify"],
            "average": averaged - t_load,
            "save": end - averaged,
        }
    peaks["save"] = status_kib("VmHWM")
    return {
        "variant": spec["variant"],
        "k": len(members),
        "total": end - start,
        "seconds": seconds,
        "baseline_kib": baseline,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "vmhwm_kib": status_kib("VmHWM"),
        "peaks_kib": peaks,
        "rss_after_average_kib": rss_after_average,
        "mapped_kib": mapped.get("kib"),
        "sha256": ckpt.weights_digest(manifest),
        "files": len(ckpt.weight_files(manifest)),
    }


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``5`` to ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_write(spec: dict) -> dict:
    """Peak RSS of ``save_checkpoint`` beyond the state dict it writes: the state is built in
    place (no temporaries), the high-water mark reset, then the checkpoint is written."""
    import gc

    import torch

    from mlflow_ema.checkpoint import save_checkpoint, weight_files

    g = torch.Generator().manual_seed(0)
    state = {}
    for name, shape, init in layout(spec["size_bytes"], spec["layout"]):
        if init in INTS:
            state[name] = torch.zeros(shape, dtype=torch.int64)
        else:
            state[name] = torch.empty(shape).normal_(0, 0.02, generator=g)
    torch.ones(1 << 16).add_(1)
    gc.collect()
    baseline = status_kib("VmRSS")
    reset = reset_peak_rss()
    start = time.perf_counter()
    out = Path(spec["output"])
    manifest = save_checkpoint(out, state, kind="ema", max_shard_size=spec["max_shard_size"])
    seconds = time.perf_counter() - start
    files = weight_files(manifest)
    return {
        "seconds": seconds,
        "baseline_kib": baseline,
        "hwm_kib": status_kib("VmHWM"),
        "reset": reset,
        "files": len(files),
        "largest_file": max(manifest.files[f]["bytes"] for f in files),
        "largest_tensor": max(t.numel() * t.element_size() for t in state.values()),
    }


def child_compare(spec: dict) -> dict:
    """Do the outputs of (1) and (2) hold the same tensors (up to float rounding)?"""
    import torch

    from mlflow_ema.checkpoint import load_checkpoint

    a = load_checkpoint(spec["a"]).state_dict
    b = load_checkpoint(spec["b"]).state_dict
    problems = []
    if a.keys() != b.keys():
        problems.append(f"keys differ: {sorted(a.keys() ^ b.keys())[:3]}")
    worst = 0.0
    for key in sorted(a.keys() & b.keys()):
        x, y = a[key], b[key]
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{key}: {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}")
        elif not x.is_floating_point():
            if not torch.equal(x, y):
                problems.append(f"{key}: integer buffers differ")
        else:
            worst = max(worst, (x - y).abs().max().item())
            if not torch.allclose(x, y, rtol=1e-5, atol=1e-7):
                problems.append(f"{key}: differs by {(x - y).abs().max().item():.3g}")
    return {"tensors": len(a), "max_abs_diff": worst, "problems": problems[:5]}


CHILDREN = {
    "generate": child_generate,
    "measure": child_measure,
    "write": child_write,
    "compare": child_compare,
}


def run_child(kind: str, spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"the {kind} subprocess failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- reading the files: the floor ---------------------------------------------------


def files_of(folders: list[str]) -> list[Path]:
    return [f for folder in folders for f in sorted(Path(folder).iterdir())]


def read_all(files: list[Path], buffer: memoryview) -> tuple[float, int]:
    """Seconds to read every byte of ``files`` sequentially, and the bytes read."""
    total = 0
    start = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return time.perf_counter() - start, total


def hash_all(files: list[Path]) -> float:
    """Seconds to sha256 every file the way verify_checkpoint does (1 MiB chunks)."""
    start = time.perf_counter()
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(MIB):
                digest.update(chunk)
    return time.perf_counter() - start


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_fraction(files: list[Path]) -> float:
    """The fraction of the files' pages in the page cache (mincore on a fresh mapping)."""
    resident = pages = 0
    for file in files:
        size = file.stat().st_size
        if not size:
            continue
        fd = os.open(file, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {file}")
            n = -(-size // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * n)()
            try:
                if _libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {file}")
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
        resident += sum(b & 1 for b in bytes(vec))
        pages += n
    return resident / pages if pages else 1.0


def evict(files: list[Path]) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- report -------------------------------------------------------------------------


@dataclasses.dataclass
class Results:
    ks: list[int]
    ckpt_bytes: int
    gbytes: dict[int, int]  # bytes of the k checkpoint folders
    runs: dict[tuple[str, int], list[dict]] = dataclasses.field(default_factory=dict)
    reads: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    hashes: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    kept: dict[tuple[str, int], str] = dataclasses.field(default_factory=dict)  # last output per variant
    shard_bytes: int | None = None  # --shard-mb: members and outputs sharded at this size
    writes: dict[str, dict] = dataclasses.field(default_factory=dict)  # write_memory(): per layout


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def median(runs: list[dict], get) -> float:
    return statistics.median(get(r) for r in runs)


def peak_x(run: dict, kib: int, ckpt_bytes: int) -> float:
    return (kib - run["baseline_kib"]) * 1024 / ckpt_bytes


def report(res: Results) -> dict[int, dict[str, float]]:
    """Print the warm-cache tables; return per k the numbers the targets use."""
    ks, runs, reads, hashes, ckpt_bytes, gbytes = (
        res.ks, res.runs, res.reads, res.hashes, res.ckpt_bytes, res.gbytes
    )  # fmt: skip
    summary: dict[int, dict[str, float]] = {}
    print("\n### Wall time, warm page cache (median over the rounds)\n")
    print("| k | bytes read | (3) read k files | sha256 k files | (1) soup.average + save | (1) / read "
          "| (2) load all + save | (2) / read | (2) / (1) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in ks:
        read, sha = statistics.median(reads[k]), statistics.median(hashes[k])
        soup = median(runs[SOUP, k], lambda r: r["total"])
        naive = median(runs[NAIVE, k], lambda r: r["total"])
        print(
            f"| {k} | {gbytes[k] / MIB:,.0f} MiB | {fmt_s(read)} ({gbytes[k] / read / 1e9:.1f} GB/s) "
            f"| {fmt_s(sha)} ({gbytes[k] / sha / 1e9:.1f} GB/s) | {fmt_s(soup)} | {soup / read:.1f}x "
            f"| {fmt_s(naive)} | {naive / read:.1f}x | {naive / soup:.2f}x |"
        )
        summary[k] = {"read": read, "sha": sha, "soup": soup}

    print("\n### Where the time of (1) goes (median s)\n")
    parts = ["verify", "average", "save", "save write", "save sha256", "save finite", "save fsync"]
    print("| k | " + " | ".join(parts) + " | total | average / read | (total - verify) / read |")
    print("|---:|" + "---:|" * (len(parts) + 3))
    for k in ks:
        cells = [f"{median(runs[SOUP, k], lambda r, p=p: r['seconds'][p]):.2f}" for p in parts]
        avg = median(runs[SOUP, k], lambda r: r["seconds"]["average"])
        rest = median(runs[SOUP, k], lambda r: r["total"] - r["seconds"]["verify"])
        total = summary[k]["soup"]
        read = summary[k]["read"]
        print(f"| {k} | {' | '.join(cells)} | {total:.2f} | {avg / read:.1f}x | {rest / read:.1f}x |")
    print("\n### Where the time of (2) goes (median s)\n")
    parts2 = ["verify", "load", "average", "save"]
    print("| k | " + " | ".join(parts2) + " | total |")
    print("|---:|" + "---:|" * (len(parts2) + 1))
    for k in ks:
        cells = [f"{median(runs[NAIVE, k], lambda r, p=p: r['seconds'][p]):.2f}" for p in parts2]
        print(f"| {k} | {' | '.join(cells)} | {median(runs[NAIVE, k], lambda r: r['total']):.2f} |")

    print(
        f"\n### Peak RSS above the child's baseline, in checkpoints ({ckpt_bytes / MIB:.1f} MiB), "
        "worst over the rounds\n"
    )
    print("| k | variant | baseline | peak after verify | after load | after average | after save "
          "= ru_maxrss | RSS kept after average | file pages still mapped as averaging ends |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for k in ks:
        for variant in VARIANTS:
            worst = max(runs[variant, k], key=lambda r: r["maxrss_kib"] - r["baseline_kib"])
            p = worst["peaks_kib"]
            load = f"{peak_x(worst, p['load'], ckpt_bytes):.2f}x" if "load" in p else "-"
            mapped = "-" if worst["mapped_kib"] is None else f"{worst['mapped_kib'] / 1024:.0f} MiB"
            print(
                f"| {k} | {variant} | {worst['baseline_kib'] / 1024:.0f} MiB "
                f"| {peak_x(worst, p['verify'], ckpt_bytes):.2f}x | {load} "
                f"| {peak_x(worst, p['average'], ckpt_bytes):.2f}x "
                f"| **{peak_x(worst, worst['maxrss_kib'], ckpt_bytes):.2f}x** "
                f"({(worst['maxrss_kib'] - worst['baseline_kib']) / 1024:.0f} MiB) "
                f"| {peak_x(worst, worst['rss_after_average_kib'], ckpt_bytes):.2f}x | {mapped} |"
            )
        summary[k]["rss"] = max(peak_x(r, r["maxrss_kib"], ckpt_bytes) for r in runs[SOUP, k])
    if len(ks) > 1:
        lo, hi = min(ks), max(ks)
        grow = (summary[hi]["rss"] - summary[lo]["rss"]) * ckpt_bytes / MIB
        print(f"\npeak RSS of (1) at k={hi} minus k={lo}: {grow:+.0f} MiB (it should not grow with k)")
    for k in ks:
        read, sha, soup = summary[k]["read"], summary[k]["sha"], summary[k]["soup"]
        print(
            f"\nk={k}: (1) takes {soup / read:.1f}x the warm read; its verification alone is a sha256 "
            f"pass at {gbytes[k] / sha / 1e9:.1f} GB/s, {sha / read:.1f}x the read"
        )
    return summary


# -- main ---------------------------------------------------------------------------


def load_average() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def warm_rounds(res: Results, members: list[str], tmp: Path, repeats: int) -> None:
    """The warm-cache measurements: per round and k, the read, the sha256 pass, (1) and (2)."""
    buffer = memoryview(bytearray(READ_BUFFER))
    for k in res.ks:
        read_all(files_of(members[:k]), buffer)  # warm the page cache
    n = 0
    for r in range(repeats):
        for k in res.ks:
            files = files_of(members[:k])
            res.reads.setdefault(k, []).append(read_all(files, buffer)[0])
            res.hashes.setdefault(k, []).append(hash_all(files))
            for variant in VARIANTS[r % 2 :] + VARIANTS[: r % 2]:
                n += 1
                out = tmp / f"out-{n}"
                result = run_child(
                    "measure",
                    {"variant": variant, "members": members[:k], "output": str(out),
                     "max_shard_size": res.shard_bytes},
                )  # fmt: skip
                res.runs.setdefault((variant, k), []).append(result)
                if (variant, k) in res.kept:
                    shutil.rmtree(res.kept[variant, k])
                res.kept[variant, k] = str(out)
                print(
                    f"  round {r + 1} k={k} {variant}: {result['total']:.2f} s, peak RSS +"
                    f"{(result['maxrss_kib'] - result['baseline_kib']) / 1024:.0f} MiB",
                    flush=True,
                )
            print(f"  round {r + 1} k={k} read: {res.reads[k][-1]:.2f} s, sha256: {res.hashes[k][-1]:.2f} s")


def cold_pass(res: Results, members: list[str], tmp: Path) -> None:
    """For information: the read and (1) once each with the members evicted from the page cache."""
    buffer = memoryview(bytearray(READ_BUFFER))
    print("\n### Cold page cache (members evicted with posix_fadvise(DONTNEED); one run each)\n")
    print("| k | resident before | (3) read k files | (1) soup.average + save | (1) / cold read "
          "| (1) verify | (1) average | (1) save |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    cold = True
    for k in res.ks:
        files = files_of(members[:k])
        evict(files)
        before = resident_fraction(files)
        read = read_all(files, buffer)[0]
        evict(files)
        before = max(before, resident_fraction(files))
        cold &= before < 0.01
        out = tmp / "out-cold"
        spec = {
            "variant": SOUP,
            "members": members[:k],
            "output": str(out),
            "max_shard_size": res.shard_bytes,
        }
        result = run_child("measure", spec)
        shutil.rmtree(out)
        s = result["seconds"]
        print(
            f"| {k} | {100 * before:.1f}% | {fmt_s(read)} ({res.gbytes[k] / read / 1e9:.1f} GB/s) "
            f"| {fmt_s(result['total'])} | {result['total'] / read:.1f}x | {s['verify']:.2f} "
            f"| {s['average']:.2f} | {s['save']:.2f} |"
        )
    if not cold:
        print("\n(eviction left pages in the page cache: these numbers are not cold)")


def write_memory(res: Results, size_bytes: int, kind: str, tmp: Path) -> None:
    """Peak RSS of writing one checkpoint beyond its state dict: as one file, and sharded."""
    print("\n### Writing one checkpoint: peak RSS beyond the state dict (save_checkpoint, fresh process)\n")
    print("| layout | files | largest file | largest tensor | peak RSS above the state dict | time |")
    print("|---|---:|---:|---:|---:|---:|")
    layouts = {"one file": None} | (
        {f"shards of {res.shard_bytes / MIB:g} MiB": res.shard_bytes} if res.shard_bytes else {}
    )
    for name, limit in layouts.items():
        out = tmp / "out-write"
        w = run_child(
            "write", {"size_bytes": size_bytes, "layout": kind, "output": str(out), "max_shard_size": limit}
        )
        shutil.rmtree(out)
        res.writes[name] = w
        extra = (w["hwm_kib"] - w["baseline_kib"]) * 1024
        note = "" if w["reset"] else " (VmHWM could not be reset: includes building the state)"
        print(
            f"| {name} | {w['files']} | {w['largest_file'] / MIB:.1f} MiB | {w['largest_tensor'] / MIB:.1f} MiB "
            f"| {extra / MIB:.1f} MiB{note} | {fmt_s(w['seconds'])} |"
        )


def checks(res: Results, summary: dict[int, dict[str, float]]) -> list[tuple[str, bool]]:
    lines = []
    for name, w in res.writes.items():
        if name == "one file":
            continue
        extra = (w["hwm_kib"] - w["baseline_kib"]) * 1024
        lines.append(
            (
                f"target: writing {name}: peak RSS beyond the state dict <= one shard: "
                f"{extra / MIB:.1f} MiB ({extra / res.shard_bytes:.2f} shards)",
                extra <= res.shard_bytes and w["files"] > 1,
            )
        )
    for k in res.ks:
        cmp = run_child("compare", {"a": res.kept[SOUP, k], "b": res.kept[NAIVE, k]})
        problems = f": {'; '.join(cmp['problems'])}" if cmp["problems"] else ""
        lines.append(
            (
                f"sanity: k={k}: (1) and (2) give the same {cmp['tensors']} tensors "
                f"(max |diff| {cmp['max_abs_diff']:.1e}){problems}",
                not cmp["problems"],
            )
        )
        if res.shard_bytes:
            files = {r["files"] for v in VARIANTS for r in res.runs[v, k]}
            lines.append((f"sanity: k={k}: every output was written as {files} shards", min(files) > 1))
        digests = {r["sha256"] for r in res.runs[SOUP, k]}
        lines.append(
            (
                f"sanity: k={k}: (1) wrote byte-identical files in all {len(res.runs[SOUP, k])} rounds",
                len(digests) == 1,
            )
        )
    inherited = [
        r
        for rs in res.runs.values()
        for r in rs
        if abs(r["maxrss_kib"] - r["vmhwm_kib"]) > 0.01 * r["vmhwm_kib"]
    ]
    lines.append(
        ("sanity: ru_maxrss = VmHWM in every child (no peak RSS inherited from the parent)", not inherited)
    )
    for k in res.ks:
        rss = summary[k]["rss"]
        lines.append(
            (
                f"target: k={k}: peak RSS of (1) above baseline <= {RSS_TARGET}x one checkpoint: {rss:.2f}x",
                rss <= RSS_TARGET,
            )
        )
    for k in res.ks:
        soup, read = summary[k]["soup"], summary[k]["read"]
        lines.append(
            (
                f"target: k={k}: wall time of (1) <= {TIME_TARGET}x reading the k files (warm): "
                f"{soup:.2f} s / {read:.2f} s = {soup / read:.1f}x",
                soup <= TIME_TARGET * read,
            )
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, help="MiB per checkpoint (default 200, with --quick 32)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="32 MiB checkpoints, k=2, 1 round: a smoke run, not a measurement",
    )
    parser.add_argument(
        "--layout",
        choices=("transformer", "convnet"),
        default="transformer",
        help="413 tensors, the largest 18%% of the checkpoint (default), or 3002 small ones",
    )
    parser.add_argument(
        "--shard-mb",
        type=float,
        help="write the members and the outputs sharded at this many MiB (e.g. 50); default: one file each",
    )
    parser.add_argument("--tmp", help="where to write the checkpoints (default: the system temp folder)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return 0

    ks = [2] if args.quick else [2, 8]
    size_mb = args.size_mb or (32 if args.quick else 200)
    repeats = 1 if args.quick else args.repeats
    size_bytes = int(size_mb * MIB)
    shard_bytes = int(args.shard_mb * MIB) if args.shard_mb else None
    tmp_root = Path(args.tmp or tempfile.gettempdir())
    usage = shutil.disk_usage(tmp_root)
    need = (max(ks) + len(VARIANTS) * len(ks) + 2) * size_bytes * 1.1
    print(
        f"{os.cpu_count()} CPUs, {load_average()}; {tmp_root}: {usage.free / 2**30:.1f} GiB free "
        f"of {usage.total / 2**30:.1f} GiB, this run needs {need / 2**30:.1f} GiB"
    )
    if usage.free < need:
        raise SystemExit(f"not enough disk space in {tmp_root}")
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    if available < 2 * (max(ks) + 2) * size_bytes:
        print(f"warning: {available / 2**30:.1f} GiB available: the members may not stay in the page cache")
    print(
        f"{args.layout} checkpoint: {describe(layout(size_bytes, args.layout))}; k = {ks}; {repeats} rounds"
    )
    if shard_bytes:
        print(f"members and outputs sharded at {args.shard_mb:g} MiB (max_shard_size={shard_bytes})")

    tmp = Path(tempfile.mkdtemp(prefix="mlflow-ema-bench-average-", dir=tmp_root))
    try:
        start = time.perf_counter()
        members = run_child(
            "generate",
            {"dir": str(tmp), "k": max(ks), "size_bytes": size_bytes, "layout": args.layout,
             "max_shard_size": shard_bytes},
        )["paths"]  # fmt: skip
        weights = sorted(Path(members[0]).glob("*.safetensors"))
        ckpt_bytes = sum(f.stat().st_size for f in weights)
        print(
            f"wrote {len(members)} checkpoints of {ckpt_bytes / MIB:.1f} MiB "
            f"({', '.join(f'{f.name} {f.stat().st_size / MIB:.1f} MiB' for f in weights)}) "
            f"in {time.perf_counter() - start:.1f} s"
        )
        gbytes = {k: sum(f.stat().st_size for f in files_of(members[:k])) for k in ks}
        res = Results(ks, ckpt_bytes, gbytes, shard_bytes=shard_bytes)
        warm_rounds(res, members, tmp, repeats)
        summary = report(res)
        cold_pass(res, members, tmp)
        write_memory(res, size_bytes, args.layout, tmp)
        lines = checks(res, summary)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{load_average()} at the end; removed {tmp}\n")
    return print_verdicts(lines, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
