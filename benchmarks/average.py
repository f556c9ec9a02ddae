"""Benchmark: ``mlflow_ema.average_checkpoints`` against its floor and fairseq/timm-style averaging.

Issue 15, item 2: wall time of ``average_checkpoints(paths, output)`` at most 1.3x the floor,
which is one parallel sha256 pass over the inputs plus writing the output once and hashing it
once. k = 2 and k = 8 members of ``--size-mb`` MiB each (default 200).

Members: fp32 state dicts of transformer shapes (an embedding, 24 blocks of attention, MLP,
LayerNorm and BatchNorm tensors: 413 tensors, 25 of them int64 buffers ``num_batches_tracked``
and ``position_ids``; ``--layout convnet``: 3002 tensors of a few hundred KiB), each one a shared
init plus its own small perturbation, written with ``save_checkpoint(kind="raw",
init_fingerprint=init_fingerprint(init))`` (so the init check passes) and the same state dicts
with ``torch.save`` as ``.pt`` files for the reference arms. Arms, each run in a fresh
subprocess, interleaved in ``--repeats`` rounds (the order rotating), same k:

- ``ours``: ``average_checkpoints(paths, output)`` into a new folder. Its time is split by
  wrapping library functions with timers (which does not change what they do): verify
  (``check_members``: sha256 of every member file, parallel threads), sum (the rest of
  ``soup.average``), and the save's write (``save_file``), sha256 of the output, NaN/inf check
  and fsync;
- ``floor``: (a) one sha256 pass over every file of the k inputs, in threads (one per core, as
  ``parallel_map`` does), (b) ``safetensors.torch.save_file`` of the averaged state dict (loaded
  before timing) and (c) one sha256 of that file. floor = a + b + c. For information the child
  also times an fsync of the output (not in the floor: ``save_checkpoint`` pays one) and
  (b + c) overlapped: the same bytes written while a second thread hashes them (the digest is
  checked to equal (c)'s);
- ``fairseq-style`` (the way ``scripts/average_checkpoints.py`` works, reimplemented here): per
  member ``torch.load(map_location="cpu", weights_only=True)``, clone the first, add the others
  in fp32, divide, ``torch.save``;
- ``timm-style`` (the way ``avg_checkpoints.py`` works, reimplemented here): the same with an
  fp64 accumulator, cast back to the input dtype, ``torch.save``.
  In both, integer buffers are the first member's (as ours); neither verifies any hash.

Sanity: every arm's output holds the same tensors as an fp64 reference average computed when
the members are written (fp32 arms: ``allclose(rtol=1e-5, atol=1e-7)``; timm-style: within
fp32 rounding of the fp64 mean, ``rtol=2e-7``); integer buffers identical.

Memory: each child takes ``VmRSS`` after its imports as baseline and reports ``ru_maxrss`` minus
it, in multiples of one checkpoint's file size (the parent imports no torch and stays small, as
a child's ``ru_maxrss`` starts at its parent's peak; a check confirms ``ru_maxrss`` = ``VmHWM``).
RSS counts anonymous memory and mapped file pages, not the page cache that reads and writes go
through: the kernel's cache of the members and outputs is outside these numbers.

Time: wall, inside the child (imports excluded). The page cache is warm: every member file is
read once before the rounds and stays cached (nothing is dropped: that needs root and hits
every user of the machine). Medians and [min-max] over the rounds.

Run from the repository root (5-10 minutes and about 6 GB of temporary disk for the default)::

    .venv/bin/python benchmarks/average.py [--size-mb 200] [--repeats 5] [--layout convnet] [--tmp DIR]
    .venv/bin/python benchmarks/average.py --quick      # 16 MiB members, 1 round: a smoke run

Exits with status 1 if a sanity check or the target fails (with ``--quick``, only sanity checks).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import print_verdicts  # a sibling module: the scripts run from benchmarks/

# No torch at module level: the parent must stay small (see the docstring).

OURS, FLOOR, FAIRSEQ, TIMM = "ours", "floor", "fairseq-style", "timm-style"
ARMS = (OURS, FLOOR, FAIRSEQ, TIMM)
LAYERS = 24  # transformer blocks
SEQ = 512
CONV_BLOCKS = 500  # convnet blocks
INTS = ("arange", "steps")  # the inits of int64 buffers
MIB = 1 << 20
HASH_CHUNK = MIB  # as the library's _file_digest
PIPE_CHUNK = 8 * MIB  # write-while-hashing: bytes per chunk handed to the hashing thread
TARGET = 1.3  # ours, in times the floor


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
    """The members (checkpoint folder and .pt), each the shared init plus its own perturbation,
    and per k the fp64 reference average of the first k (cast to fp32, as a safetensors file)."""
    import torch
    from safetensors.torch import save_file

    import mlflow_ema
    from mlflow_ema.checkpoint import init_fingerprint, save_checkpoint

    g = torch.Generator().manual_seed(0)
    init = {}
    for name, shape, kind in layout(spec["size_bytes"], spec["layout"]):
        if kind in INTS:
            init[name] = torch.arange(math.prod(shape), dtype=torch.int64).view(shape)
        elif kind == "ones":
            init[name] = 1 + 0.01 * torch.randn(shape, generator=g)
        elif kind == "var":
            init[name] = 0.5 + torch.rand(shape, generator=g)
        else:
            init[name] = 0.02 * torch.randn(shape, generator=g)
    fingerprint = init_fingerprint(init)
    out = {"folders": [], "pts": [], "references": {}, "library": str(Path(mlflow_ema.__file__).parent)}
    total: dict = {}
    for i in range(max(spec["ks"])):
        g = torch.Generator().manual_seed(i + 1)
        state = {}
        for name, value in init.items():  # a fine-tuned member: the init plus a small step
            if name.endswith("num_batches_tracked"):
                state[name] = torch.tensor(1000 * (i + 1), dtype=torch.int64)
            elif value.is_floating_point():
                state[name] = value + 0.002 * torch.randn(value.shape, generator=g)
            else:
                state[name] = value.clone()
        folder, pt = Path(spec["dir"]) / f"member-{i}", Path(spec["dir"]) / f"member-{i}.pt"
        save_checkpoint(folder, state, kind="raw", step=1000 * (i + 1), init_fingerprint=fingerprint)
        torch.save(state, pt)
        fd = os.open(pt, os.O_RDONLY)  # written back now, not during the rounds
        os.fsync(fd)
        os.close(fd)
        out["folders"].append(str(folder))
        out["pts"].append(str(pt))
        for name, value in state.items():
            if not value.is_floating_point():
                total.setdefault(name, value)  # integer buffers: the first member's
            elif name in total:
                total[name] += value
            else:
                total[name] = value.double()
        if i + 1 in spec["ks"]:
            reference = {n: (v / (i + 1)).float() if v.is_floating_point() else v for n, v in total.items()}
            ref = Path(spec["dir"]) / f"reference-k{i + 1}.safetensors"
            save_file(reference, ref, metadata={"format": "pt"})
            out["references"][i + 1] = str(ref)
        del state
    return out


# -- the arms (each in a fresh subprocess) --------------------------------------------


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

    def wrap(self, module, attr: str, key: str, before=None) -> None:
        """Time ``module.attr`` under ``key`` (skipped if the library no longer has it)."""
        fn = getattr(module, attr, None)
        if fn is None:
            return

        def timed(*args, **kwargs):
            if before is not None:
                before()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

        setattr(module, attr, timed)


def run_ours(spec: dict) -> dict:
    """``average_checkpoints`` with its phases timed: verify (inside ``soup.average``), sum (the
    rest of it) and the save's parts. The output's sha256 timer is installed when the save
    starts, since verification calls the same function."""
    import mlflow_ema
    import mlflow_ema.checkpoint as ckpt
    import mlflow_ema.soup as soup

    clock = Clock()
    clock.wrap(soup, "check_members", "verify")
    clock.wrap(soup, "average", "average")
    clock.wrap(ckpt, "save_file", "write")  # up to 3616cae: save_file, then a sha256 pass
    clock.wrap(ckpt, "write_safetensors", "write")  # since: written and hashed in one pass
    clock.wrap(ckpt, "_finite", "finite")
    clock.wrap(ckpt, "_fsync", "fsync")
    clock.wrap(soup, "save_checkpoint", "save", before=lambda: clock.wrap(ckpt, "_file_digest", "sha256"))
    start = time.perf_counter()
    mlflow_ema.average_checkpoints(spec["members"], spec["output"])
    total = time.perf_counter() - start
    s = clock.seconds
    parts = {"verify": s.get("verify", 0.0), "sum": s.get("average", 0.0) - s.get("verify", 0.0)}
    parts |= {k: s.get(k, 0.0) for k in ("write", "sha256", "finite", "fsync")}
    parts["other"] = total - sum(parts.values())
    return {"total": total, "seconds": parts}


def sha256_file(file: Path, buffer: memoryview) -> str:
    digest = hashlib.sha256()
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(buffer[:n])
    return digest.hexdigest()


def sha256_parallel(files: list[Path]) -> None:
    """Every file's sha256, in one thread per core (hashlib releases the GIL)."""
    workers = max(1, min(len(files), os.cpu_count() or 1))
    buffers = {}

    def one(file: Path) -> str:
        import threading

        buf = buffers.setdefault(threading.get_ident(), memoryview(bytearray(HASH_CHUNK)))
        return sha256_file(file, buf)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, files))


def write_while_hashing(written: Path, tensors: dict, out: Path) -> str:
    """The bytes of ``written`` (a safetensors file of ``tensors``) written again to ``out``
    from the tensors, in batches of about 8 MiB: a second thread hashes each batch while the
    main thread writes it (both release the GIL)."""
    import torch

    with open(written, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
    entries = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
    order = sorted(entries, key=lambda k: entries[k]["data_offsets"][0])
    views = [memoryview(len(header).to_bytes(8, "little")), memoryview(header)]
    for name in order:
        data = memoryview(tensors[name].contiguous().view(-1).view(torch.uint8).numpy())
        views += [data[lo : lo + PIPE_CHUNK] for lo in range(0, len(data), PIPE_CHUNK)]
    batches, size = [[]], 0
    for view in views:
        batches[-1].append(view)
        size += len(view)
        if size >= PIPE_CHUNK:
            batches.append([])
            size = 0
    digest = hashlib.sha256()

    def hash_batch(batch: list[memoryview]) -> None:
        for view in batch:
            digest.update(view)

    with ThreadPoolExecutor(max_workers=1) as pool, open(out, "wb", buffering=0) as f:
        futures = [pool.submit(hash_batch, batch) for batch in batches]  # in order: one worker
        for batch in batches:
            for view in batch:
                f.write(view)
        for future in futures:
            future.result()
    return digest.hexdigest()


def run_floor(spec: dict) -> dict:
    """(a) parallel sha256 of the inputs, (b) write the averaged state dict, (c) sha256 of it;
    for information: fsync of it, and (b)+(c) overlapped (write while a thread hashes)."""
    from safetensors.torch import load_file, save_file

    state = load_file(spec["reference"])  # the averaged state dict, before timing
    files = [f for folder in spec["members"] for f in sorted(Path(folder).iterdir())]
    out = Path(spec["output"])
    out.mkdir()
    t0 = time.perf_counter()
    sha256_parallel(files)
    t1 = time.perf_counter()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    t2 = time.perf_counter()
    digest = sha256_file(out / "model.safetensors", memoryview(bytearray(HASH_CHUNK)))
    t3 = time.perf_counter()
    fd = os.open(out / "model.safetensors", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    t4 = time.perf_counter()
    piped = write_while_hashing(out / "model.safetensors", state, out / "piped.safetensors")
    t5 = time.perf_counter()
    (out / "piped.safetensors").unlink()
    seconds = {"sha256 inputs": t1 - t0, "write": t2 - t1, "sha256 output": t3 - t2}
    seconds |= {"fsync (info)": t4 - t3, "write+hash overlapped (info)": t5 - t4}
    return {"total": t3 - t0, "seconds": seconds, "piped_same_digest": piped == digest}


def run_torch_load(spec: dict, accumulate) -> dict:
    """fairseq-style (fp32) or timm-style (fp64): one member at a time with torch.load, summed
    into an accumulator, divided, cast back, torch.save. Integer buffers: the first member's."""
    import torch

    seconds = {"load": 0.0, "sum": 0.0, "save": 0.0}
    start = time.perf_counter()
    acc: dict = {}
    dtypes: dict = {}  # the inputs' dtypes, to cast back to
    for i, path in enumerate(spec["members"]):
        t = time.perf_counter()
        state = torch.load(path, map_location="cpu", weights_only=True)
        seconds["load"] += time.perf_counter() - t
        t = time.perf_counter()
        for name, value in state.items():
            if not value.is_floating_point():
                acc.setdefault(name, value)
            elif i == 0:
                dtypes[name] = value.dtype
                acc[name] = value.to(accumulate, copy=True)  # fairseq: clone(); timm: to(float64)
            else:
                acc[name] += value.to(accumulate)
        del state
        seconds["sum"] += time.perf_counter() - t
    t = time.perf_counter()
    result = {}
    for name in list(acc):
        value = acc.pop(name)
        if value.is_floating_point():
            value = value.div_(len(spec["members"])).to(dtypes[name])
        result[name] = value
    seconds["sum"] += time.perf_counter() - t
    t = time.perf_counter()
    torch.save(result, spec["output"])
    seconds["save"] = time.perf_counter() - t
    return {"total": time.perf_counter() - start, "seconds": seconds}


def child_measure(spec: dict) -> dict:
    import gc

    import torch

    import mlflow_ema.checkpoint  # noqa: F401  (imported before the baseline in every arm)

    torch.ones(1 << 16).add_(1)  # start torch's thread pool before the baseline
    gc.collect()
    baseline = status_kib("VmRSS")
    arm = spec["arm"]
    if arm == OURS:
        result = run_ours(spec)
    elif arm == FLOOR:
        result = run_floor(spec)
    else:
        result = run_torch_load(spec, torch.float32 if arm == FAIRSEQ else torch.float64)
    return result | {
        "baseline_kib": baseline,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "vmhwm_kib": status_kib("VmHWM"),
    }


def child_compare(spec: dict) -> dict:
    """Each arm's output against the fp64 reference average."""
    import torch
    from safetensors.torch import load_file

    reference = load_file(spec["reference"])
    found = {}
    for arm, path in spec["outputs"].items():
        if arm in (OURS, FLOOR):
            out = load_file(str(Path(path) / "model.safetensors"))
        else:
            out = torch.load(path, map_location="cpu", weights_only=True)
        rtol, atol = (2e-7, 0.0) if arm in (TIMM, FLOOR) else (1e-5, 1e-7)
        problems, worst = [], 0.0
        if out.keys() != reference.keys():
            problems.append(f"keys differ: {sorted(out.keys() ^ reference.keys())[:3]}")
        for key in sorted(out.keys() & reference.keys()):
            x, y = out[key], reference[key]
            if x.dtype != y.dtype or x.shape != y.shape:
                problems.append(f"{key}: {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}")
            elif not x.is_floating_point():
                if not torch.equal(x, y):
                    problems.append(f"{key}: integer buffers differ")
            else:
                xd, yd = x.double(), y.double()
                diff = (xd - yd).abs()
                worst = max(worst, diff.max().item())
                if bool((diff > atol + rtol * yd.abs()).any()):  # not allclose(x, y, rtol, atol)
                    problems.append(f"{key}: differs by {diff.max().item():.3g}")
        found[arm] = {"tensors": len(out), "max_abs_diff": worst, "problems": problems[:3]}
    return found


CHILDREN = {"generate": child_generate, "measure": child_measure, "compare": child_compare}


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


# -- the rounds -----------------------------------------------------------------------


@dataclasses.dataclass
class Results:
    ks: list[int]
    ckpt_bytes: int
    input_bytes: dict[int, int]  # bytes of the k members' folders
    runs: dict[tuple[str, int], list[dict]] = dataclasses.field(default_factory=dict)
    kept: dict[tuple[str, int], str] = dataclasses.field(default_factory=dict)  # last output per arm


def warm(files: list[Path]) -> None:
    buffer = memoryview(bytearray(8 * MIB))
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def cpu_pressure() -> float:
    """Microseconds some task waited for a CPU, machine-wide (/proc/pressure/cpu), or 0."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return 0.0


def remove(path: str) -> None:
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def rounds(res: Results, members: dict, tmp: Path, repeats: int) -> None:
    """Every arm at every k, in fresh subprocesses, ``repeats`` rounds, the order rotating."""
    warm(
        [f for folder in members["folders"] for f in Path(folder).iterdir()]
        + [Path(p) for p in members["pts"]]
    )
    n = 0
    for r in range(repeats):
        for k in res.ks:
            for arm in ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]:
                n += 1
                out = tmp / (f"out-{n}" + (".pt" if arm in (FAIRSEQ, TIMM) else ""))
                inputs = members["pts"] if arm in (FAIRSEQ, TIMM) else members["folders"]
                spec = {"arm": arm, "members": inputs[:k], "output": str(out),
                        "reference": members["references"][str(k)]}  # fmt: skip
                stalled, start = cpu_pressure(), time.perf_counter()
                result = run_child("measure", spec)
                result["pressure"] = (cpu_pressure() - stalled) / 1e6 / (time.perf_counter() - start)
                res.runs.setdefault((arm, k), []).append(result)
                if (arm, k) in res.kept:
                    remove(res.kept[arm, k])
                res.kept[arm, k] = str(out)
                rss = (result["maxrss_kib"] - result["baseline_kib"]) * 1024 / res.ckpt_bytes
                print(
                    f"  round {r + 1} k={k} {arm}: {result['total']:.2f} s, peak RSS {rss:.2f}x, "
                    f"CPU pressure {100 * result['pressure']:.0f}%",
                    flush=True,
                )


# -- report ---------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s [{min(values):.2f}-{max(values):.2f}]"


def peak_x(run: dict, ckpt_bytes: int) -> float:
    return (run["maxrss_kib"] - run["baseline_kib"]) * 1024 / ckpt_bytes


def part(runs: list[dict], key: str) -> float:
    return statistics.median(r["seconds"][key] for r in runs)


LABELS = {
    OURS: "ours: `average_checkpoints(paths, output)`",
    FLOOR: "floor: sha256 of inputs (threads) + write + sha256 of output",
    FAIRSEQ: "fairseq-style: `torch.load` one at a time, fp32 sum, `torch.save`",
    TIMM: "timm-style: `torch.load` one at a time, fp64 sum, `torch.save`",
}


def table(res: Results, k: int) -> dict[str, float]:
    """The Markdown table of one k; returns the median times."""
    totals = {arm: [r["total"] for r in res.runs[arm, k]] for arm in ARMS}
    med = {arm: statistics.median(v) for arm, v in totals.items()}
    n = len(totals[OURS])
    print(f"\n### k = {k}: {k} x {res.ckpt_bytes / MIB:.0f} MiB, warm page cache, {n} rounds\n")
    print("| arm | time: median [min-max] | / floor | / ours | peak RSS (checkpoints), worst round "
          "| CPU pressure, median |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for arm in ARMS:
        worst = max(peak_x(r, res.ckpt_bytes) for r in res.runs[arm, k])
        pressure = statistics.median(r["pressure"] for r in res.runs[arm, k])
        print(
            f"| {LABELS[arm]} | {spread(totals[arm])} | {med[arm] / med[FLOOR]:.2f}x "
            f"| {med[arm] / med[OURS]:.2f}x | {worst:.2f}x | {100 * pressure:.0f}% |"
        )
    paired = [o["total"] / f["total"] for o, f in zip(res.runs[OURS, k], res.runs[FLOOR, k], strict=True)]
    print(
        f"\nours / floor round by round: median {statistics.median(paired):.2f}x "
        f"[{min(paired):.2f}-{max(paired):.2f}]. CPU pressure: the share of the run's wall time in which some "
        "task on the machine waited for a CPU (/proc/pressure/cpu; other users' work included)."
    )
    floor = res.runs[FLOOR, k]
    sha_in = part(floor, "sha256 inputs")
    write, sha_out = part(floor, "write"), part(floor, "sha256 output")
    piped, fsync = part(floor, "write+hash overlapped (info)"), part(floor, "fsync (info)")
    print(
        f"\nfloor parts (median): sha256 of the inputs {sha_in:.2f} s ({res.input_bytes[k] / sha_in / 1e9:.2f} "
        f"GB/s), write {write:.2f} s, sha256 of the output {sha_out:.2f} s; floor = their sum. Writing while "
        f"a second thread hashes: {piped:.2f} s instead of {write + sha_out:.2f} s (the overlap); fsync of "
        f"the output {fsync:.2f} s (not in the floor). The floor's memory is the averaged state dict it "
        "writes, loaded before timing."
    )
    return med


def breakdown(res: Results) -> None:
    """Where ours' time goes, next to the floor's parts."""
    print("\n### Where the time of ours goes (median s), against the floor's parts\n")
    keys = ["verify", "sum", "write", "sha256", "finite", "fsync", "other"]
    print("| k | " + " | ".join(f"ours {k}" for k in keys) + " | ours total "
          "| floor: sha256 inputs | write | sha256 output | floor total | ours - floor |")  # fmt: skip
    print("|---:|" + "---:|" * (len(keys) + 6))
    for k in res.ks:
        ours, floor = res.runs[OURS, k], res.runs[FLOOR, k]
        cells = [f"{part(ours, key):.2f}" for key in keys]
        fl = [part(floor, key) for key in ("sha256 inputs", "write", "sha256 output")]
        o, f = statistics.median(r["total"] for r in ours), statistics.median(r["total"] for r in floor)
        print(
            f"| {k} | {' | '.join(cells)} | {o:.2f} | {' | '.join(f'{x:.2f}' for x in fl)} | {f:.2f} | {o - f:+.2f} |"
        )
    print("\n### Reference arms (median s)\n")
    print("| k | arm | load | sum | save | total |")
    print("|---:|---|---:|---:|---:|---:|")
    for k in res.ks:
        for arm in (FAIRSEQ, TIMM):
            runs = res.runs[arm, k]
            cells = " | ".join(f"{part(runs, key):.2f}" for key in ("load", "sum", "save"))
            print(f"| {k} | {arm} | {cells} | {statistics.median(r['total'] for r in runs):.2f} |")


def checks(res: Results, members: dict, medians: dict[int, dict[str, float]]) -> list[tuple[str, bool]]:
    lines = []
    for k in res.ks:
        outputs = {arm: res.kept[arm, k] for arm in ARMS}
        found = run_child("compare", {"reference": members["references"][str(k)], "outputs": outputs})
        for arm, cmp in found.items():
            problems = f": {'; '.join(cmp['problems'])}" if cmp["problems"] else ""
            lines.append((f"sanity: k={k}: {arm} gives the reference average's {cmp['tensors']} tensors "
                          f"(max |diff| {cmp['max_abs_diff']:.1e}){problems}", not cmp["problems"]))  # fmt: skip
        piped = all(r["piped_same_digest"] for r in res.runs[FLOOR, k])
        lines.append((f"sanity: k={k}: the overlapped write+hash wrote the same bytes as save_file", piped))
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
        ours, floor = medians[k][OURS], medians[k][FLOOR]
        lines.append((f"target: k={k}: ours <= {TARGET}x the floor: {ours:.2f} s / {floor:.2f} s = {ours / floor:.2f}x",
                      ours <= TARGET * floor))  # fmt: skip
    return lines


# -- main -----------------------------------------------------------------------------


def load_average() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def library_state() -> str:
    """The commit and whether the working tree's mlflow_ema/ differs from it."""
    dirty = git("status", "--porcelain", "--", "mlflow_ema")
    return f"HEAD {git('rev-parse', '--short', 'HEAD')}, working tree's mlflow_ema/ {'MODIFIED' if dirty else 'clean'}"


def export_library(rev: str, tmp: Path) -> str:
    """mlflow_ema/ as of ``rev``, exported under ``tmp``, first on the children's path."""
    commit = git("rev-parse", "--verify", rev + "^{commit}")
    lib = tmp / "lib"
    lib.mkdir()
    archive = subprocess.run(["git", "archive", commit, "mlflow_ema"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(lib)], input=archive, check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(lib), os.environ.get("PYTHONPATH")]))
    return commit[:10]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, help="MiB per checkpoint (default 200, with --quick 16)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="16 MiB members, 1 round: a smoke run")
    parser.add_argument("--layout", choices=("transformer", "convnet"), default="transformer",
                        help="413 tensors, the largest 18%% of the checkpoint (default), or 3002 small ones")  # fmt: skip
    parser.add_argument("--tmp", help="where to write the checkpoints (default: the system temp folder)")
    parser.add_argument(
        "--at-commit",
        metavar="REV",
        help="benchmark mlflow_ema/ as of this git revision (exported to the temporary folder and put "
        "first on the children's PYTHONPATH), not the working tree's",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args()


def check_space(tmp_root: Path, ks: list[int], size_bytes: int) -> None:
    # members in two formats, a reference per k, and per k one kept output per arm plus the next one
    need = (2 * max(ks) + len(ks) + len(ARMS) * len(ks) + 1) * size_bytes * 1.1
    df = subprocess.run(["df", "-h", str(tmp_root)], capture_output=True, text=True, check=False).stdout
    print(df.strip())
    free = shutil.disk_usage(tmp_root).free
    print(f"this run needs about {need / 2**30:.1f} GiB in {tmp_root}, {free / 2**30:.1f} GiB free")
    if free < need:
        raise SystemExit(f"not enough disk space in {tmp_root}")
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    if available < (2 * max(ks) + 8) * size_bytes:
        print(f"warning: {available / 2**30:.1f} GiB available: the members may not stay in the page cache")


def main() -> int:
    args = parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return 0
    ks = [2, 8]
    size_bytes = int((args.size_mb or (16 if args.quick else 200)) * MIB)
    repeats = 1 if args.quick else args.repeats
    tmp_root = Path(args.tmp or tempfile.gettempdir())
    print(f"{os.cpu_count()} CPUs, {load_average()}; {library_state()}")
    check_space(tmp_root, ks, size_bytes)
    print(
        f"{args.layout} checkpoint: {describe(layout(size_bytes, args.layout))}; k = {ks}; {repeats} rounds"
    )
    tmp = Path(tempfile.mkdtemp(prefix="mlflow-ema-bench-average-", dir=tmp_root))
    try:
        if args.at_commit:
            print(f"benchmarking mlflow_ema/ as of {args.at_commit} = {export_library(args.at_commit, tmp)}")
        start = time.perf_counter()
        members = run_child(
            "generate", {"dir": str(tmp), "ks": ks, "size_bytes": size_bytes, "layout": args.layout}
        )
        ckpt_bytes = (Path(members["folders"][0]) / "model.safetensors").stat().st_size
        pt_bytes = Path(members["pts"][0]).stat().st_size
        print(f"children import mlflow_ema from {members['library']}")
        print(f"wrote {len(members['folders'])} members: checkpoint folders of {ckpt_bytes / MIB:.1f} MiB "
              f"(model.safetensors) and .pt files of {pt_bytes / MIB:.1f} MiB, in {time.perf_counter() - start:.0f} s")  # fmt: skip
        input_bytes = {
            k: sum(f.stat().st_size for d in members["folders"][:k] for f in Path(d).iterdir()) for k in ks
        }
        res = Results(ks, ckpt_bytes, input_bytes)
        rounds(res, members, tmp, repeats)
        medians = {k: table(res, k) for k in ks}
        breakdown(res)
        lines = checks(res, members, medians)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{load_average()} at the end; removed {tmp}; {library_state()}\n")
    return print_verdicts(lines, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
