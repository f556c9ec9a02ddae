"""Benchmark: what ``mlflow_ema.autolog()`` costs a real CPU training loop, end to end, and
what its tracking adds beyond the EMA itself.

The same loop (an MLP of ~5.9M parameters built from ``torch.nn``, synthetic inputs and
labels from a ``TensorDataset`` through a ``DataLoader``; per step: forward, cross-entropy,
backward, ``AdamW.step()``) runs in one process, inside ``with mlflow.start_run():`` on a
sqlite store in a temporary folder, in three arms (four with ``--update-every N``):

- ``A baseline``: no mlflow-ema. Before each A (and C) run the script checks that no global
  optimizer hook, ``DataLoader`` patch or ``MlflowClient`` patch is left installed;
- ``B autolog``: ``mlflow_ema.autolog(checkpoint_every_n_epochs=1)``: an EMA update after
  every optimizer step and a raw + EMA checkpoint (two LoggedModels) at every epoch end,
  snapshotted on the training thread and written / uploaded on the background thread.
  ``mlflow_ema.autolog(disable=True)`` after each B run removes it again;
- ``C manual EMA``: no tracking by mlflow-ema, but ``ema = mlflow_ema.EMA(model,
  decay=<autolog's default schedule>)`` built at the start of the run and ``ema.update()``
  called by the loop after every ``optimizer.step()``. B/C is what tracking adds beyond the
  EMA (hooks, model search, snapshots, writing and uploading checkpoints, run end); C/A is
  what the EMA arithmetic costs inside training;
- ``D autolog update_every=N`` (``--update-every N`` only): B with ``update_every=N``, to
  see what averaging on every N-th step saves.

After an untimed warm-up the arms run in rounds, one run of each per round, in an order that
rotates every round (A B C, B C A, C A B, ...) so that a slow drift of the machine's load
hits all alike; every run trains a fresh model from the same seed on the same batches, and
logs its mean loss once per epoch with ``mlflow.log_metric`` as a training script would.
After each round, ``EMA.update()`` of the same model is timed alone, in a warm loop of
updates only, against the same call timed inside C's training loop (cache effects).

What is timed, with ``time.perf_counter``:

- every training step: the ``next()`` that fetches the batch, forward, loss, backward and
  ``optimizer.step()`` (hence autolog's optimizer hooks and the EMA update; in C the
  ``ema.update()`` call, which is also timed on its own);
- the epoch end, separately: the ``next()`` on the exhausted ``DataLoader`` iterator that
  raises ``StopIteration``. This is where autolog detects the epoch and takes the
  checkpoint snapshot (a CPU clone of the raw and EMA weights, then the queue ``put``; at
  the first checkpoint of a run also the ``torch.export`` of the architecture). The
  "checkpoint step" is the epoch's last step plus this call;
- the first steps after each checkpoint, which share the two cores with the background
  thread writing and uploading it;
- the whole run, from ``mlflow.start_run()`` to the end of its ``with`` block, whose exit
  takes the last checkpoint and waits until every checkpoint is uploaded, as wall time and
  as process CPU time (all threads; torch's OpenMP threads spin while they wait, so with 2
  threads it is about twice the wall time and no less noisy); the CPU time is also split by
  thread (training thread, upload thread, the others: torch's OpenMP workers), from
  ``/proc/self/task`` (10 ms ticks), and the minor page faults are counted.

The report: the runs in order; the medians of each arm with the ratios B/A, B/C, C/A (and
D/B); per round, B/C, C/A and B/A of process CPU and wall time and the differences of the
median steps (C - A, B - C, B - D), with their median and min-max over the rounds (the
rounds are paired: one run of each arm close in time); where B's extra wall time goes
against C and against A; and the EMA update's cost inside training (C - A per step, the
``ema.update()`` call timed in C's loop) against the same update timed alone.

glibc's malloc adapts its mmap and trim thresholds to the program's history: depending on
it, the loop's large temporaries (gradients, the optimizer's) come from the heap or are
mapped and unmapped again at every step, which costs here ~10,000 minor page faults and
~10 ms per step. Which regime a run lands in changed from run to run, A runs included,
and made most of the noise (total wall times of the same work +-10-16%). So the script
re-runs itself with the thresholds fixed (``GLIBC_TUNABLES`` with ``MALLOC_TUNABLES``:
allocations up to 32 MB from the heap, which is never trimmed), unless ``--default-malloc``
or ``GLIBC_TUNABLES`` already sets them; the minor page faults per step of every run are
printed either way.

Last, one more B run is instrumented (unless ``--no-profile``): the thread CPU and wall time
spent in the library's functions on each thread (step hooks, snapshots, architecture
export, ``save_checkpoint`` and its parts: safetensors, sha256, fsync, finite check; the
MLflow client calls), to say where B's extra CPU goes. It is not part of the ratios.

Targets: B's process CPU time at most 3% above C's (median over the rounds of B/C), B's
total wall time at most 5% above A's (median over the rounds of B/A), and the checkpoint
step at most 2x the median step of B (median over the checkpoints). Sanity checks: every B
(and D) run created 2 READY LoggedModels per epoch and its EMA saw every step; C's EMA was
updated at every step; A and C runs created none; and ``autolog(disable=True)`` left no
native thread behind (OS threads Python did not start, counted before the first run and
after the last). A torch op run on the uploader thread starts a second OpenMP team, after
which every step of the process is slower, A runs included: the ratios would hide that
cost. The first run is an A run before autolog was ever enabled; its median step against
the later A runs' is printed too (one run only, so noisy: not a check).

The checkpoint cadence: one per epoch, ``--steps`` steps (default 256, ~10 s of training on
this 2-core machine; 3 epochs per run). What tracking adds is mostly a fixed cost per
checkpoint (~0.37 CPU s measured for the 2 x 24 MB written, hashed and uploaded, and the
training steps it slows), so B/C depends on the cadence above all: 1.070 at 64 steps (a 47 MB
checkpoint every ~3 s), 1.020 at 256 (earlier runs). 256 is still far more often than jobs
checkpoint in practice (minutes apart) while keeping a run short; ``--steps 64 --epochs 5`` is
the stress case, reported in ``benchmarks/README.md`` too.

Run from the repository root (about 8 minutes with the defaults on a quiet machine; ``--quick``
for a short smoke run)::

    .venv/bin/python benchmarks/training_overhead.py [--rounds 5] [--epochs 3] [--steps 256]
        [--update-every 4] [--threads N] [--default-malloc] [--no-profile] [--quick]

Exits with status 1 if a sanity check or a target fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import torch
from _common import print_verdicts  # a sibling module: the scripts run from benchmarks/
from mlflow import MlflowClient
from torch import nn
from torch.nn import functional as F
from torch.optim import optimizer as torch_optimizer
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.dataloader import _BaseDataLoaderIter

import mlflow_ema
from mlflow_ema import checkpoint as ckpt_module
from mlflow_ema import checkpointing, run_end, uploader
from mlflow_ema.options import default_decay
from mlflow_ema.session import Session

BASELINE, AUTOLOG, MANUAL = "A baseline", "B autolog", "C manual EMA"
CPU_TARGET = 1.03  # B process CPU time at most 3% above C
TOTAL_TARGET = 0.05  # B total wall time at most 5% above A
SPIKE_TARGET = 2.0  # checkpoint step at most 2x the median step
AFTER = 10  # steps after a checkpoint that may share the cores with its upload
SEED = 0
# autolog's upload thread (mlflow-ema-uploader) and the helper threads it starts (sha256)
UPLOADER_THREADS = ("mlflow-ema-",)
THREADS = ("training thread", "other threads", "upload thread")
ISOLATED_UPDATES = 20  # EMA.update() calls per isolated timing
# glibc malloc's mmap and trim thresholds, fixed (see the module docstring)
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"

# What autolog patches, as they were before it was ever called.
_ORIGINALS = {
    "_BaseDataLoaderIter.__next__": (
        _BaseDataLoaderIter,
        "__next__",
        _BaseDataLoaderIter.__dict__["__next__"],
    ),
    **{
        f"MlflowClient.{name}": (MlflowClient, name, MlflowClient.__dict__[name])
        for name in ("log_metric", "log_batch", "set_terminated")
    },
}


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    ema: str  # "none", "manual" (the loop calls EMA.update()) or "autolog"
    update_every: int = 1


ARM_A, ARM_B, ARM_C = Arm(BASELINE, "none"), Arm(AUTOLOG, "autolog"), Arm(MANUAL, "manual")


# -- the training loop ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    in_features: int = 512
    hidden: int = 1024
    depth: int = 6  # Linear layers of width `hidden`
    classes: int = 100
    batch_size: int = 128
    steps_per_epoch: int = 256  # a checkpoint every ~10 s of training here (see the docstring)
    epochs: int = 3
    device: str = "cpu"  # "cuda": model, batches and EMA on the GPU (--device)


def build_model(s: Setup) -> nn.Module:
    """An MLP of ~5.9M parameters in 14 tensors (default Setup)."""
    layers: list[nn.Module] = [nn.Linear(s.in_features, s.hidden), nn.GELU()]
    for _ in range(s.depth - 1):
        layers += [nn.Linear(s.hidden, s.hidden), nn.GELU()]
    layers.append(nn.Linear(s.hidden, s.classes))
    return nn.Sequential(*layers).to(s.device)


def build_data(s: Setup) -> TensorDataset:
    g = torch.Generator().manual_seed(SEED)
    n = s.batch_size * s.steps_per_epoch
    return TensorDataset(
        torch.randn(n, s.in_features, generator=g), torch.randint(0, s.classes, (n,), generator=g)
    )


@dataclasses.dataclass
class RunResult:
    arm: str
    round: int
    steps_ms: list[list[float]] = dataclasses.field(default_factory=list)  # per epoch, per step
    epoch_end_ms: list[float] = dataclasses.field(default_factory=list)  # the StopIteration next()
    update_ms: list[float] = dataclasses.field(default_factory=list)  # C: each ema.update() call
    run_end_ms: float = 0.0  # exit of the `with mlflow.start_run()` block (uploads flushed)
    total_s: float = 0.0  # start_run() to the end of its block
    cpu_s: float = 0.0  # process CPU time (all threads) over the same span
    thread_cpu: dict[str, float] = dataclasses.field(default_factory=dict)  # THREADS -> CPU s
    page_faults: int = 0  # minor page faults of the process over the same span
    logged_models: int = 0
    ready_models: int = 0
    ema_steps: int | None = None
    ema_updates: int | None = None
    update_every: int = 1

    @property
    def all_steps(self) -> list[float]:
        return [ms for epoch in self.steps_ms for ms in epoch]

    @property
    def median_step(self) -> float:
        return statistics.median(self.all_steps)

    @property
    def checkpoint_steps(self) -> list[float]:
        """The loop iterations that include an epoch end: last step + the StopIteration next()."""
        return [epoch[-1] + end for epoch, end in zip(self.steps_ms, self.epoch_end_ms, strict=True)]

    @property
    def after_checkpoint(self) -> list[float]:
        """The first step of every epoch but the first: the first one after a checkpoint."""
        return [epoch[0] for epoch in self.steps_ms[1:]]

    @property
    def after_excess(self) -> float:
        """ms the first AFTER steps of every epoch but the first took beyond this run's median step."""
        median = self.median_step
        return sum(ms - median for epoch in self.steps_ms[1:] for ms in epoch[:AFTER])


def run_epoch(
    model: nn.Module, optimizer: Any, loader: DataLoader, ema: Any, result: RunResult
) -> tuple[int, float]:
    """One epoch of the timed loop; returns its number of steps and its mean loss. On a GPU
    ``loss.item()`` waits for the step's kernels, so a step's time is the GPU's too."""
    device = next(model.parameters()).device
    it = iter(loader)
    times: list[float] = []
    loss_sum = 0.0
    while True:
        t0 = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            result.epoch_end_ms.append(1e3 * (time.perf_counter() - t0))
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if ema is not None:  # C: the loop updates its EMA itself
            t1 = time.perf_counter()
            ema.update()
            result.update_ms.append(1e3 * (time.perf_counter() - t1))
        loss_sum += loss.item()
        times.append(1e3 * (time.perf_counter() - t0))
    result.steps_ms.append(times)
    return len(times), loss_sum / len(times)


def train(s: Setup, dataset: TensorDataset, result: RunResult, arm: Arm) -> None:
    torch.manual_seed(SEED)
    model = build_model(s)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loader = DataLoader(
        dataset, batch_size=s.batch_size, shuffle=True, generator=torch.Generator().manual_seed(SEED),
        pin_memory=s.device == "cuda",
    )  # fmt: skip
    step = 0
    threads_start, faults_start = thread_cpu(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start, cpu_start = time.perf_counter(), time.process_time()
    with mlflow.start_run() as run:
        # C builds its EMA inside the timed span, as autolog does at the first step.
        ema = mlflow_ema.EMA(model, decay=default_decay()) if arm.ema == "manual" else None
        for _ in range(s.epochs):
            steps, mean_loss = run_epoch(model, optimizer, loader, ema, result)
            step += steps
            mlflow.log_metric("train_loss", mean_loss, step=step)
        if arm.ema == "autolog":
            ema = mlflow_ema.get_ema(model)
        if ema is not None:
            result.ema_steps, result.ema_updates = ema.step, ema.num_updates
        exit_start = time.perf_counter()
    end, cpu_end = time.perf_counter(), time.process_time()
    result.run_end_ms = 1e3 * (end - exit_start)
    result.total_s = end - start
    result.cpu_s = cpu_end - cpu_start
    result.thread_cpu = cpu_by_thread(threads_start, thread_cpu())
    result.page_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start
    models = MlflowClient().search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    result.logged_models = len(models)
    result.ready_models = sum(str(m.status).endswith("READY") for m in models)


# -- arms: autolog's machinery installed for B and D, none for A and C -------------------


def installed_hooks() -> list[str]:
    """What of autolog's machinery is installed right now (empty: a clean baseline)."""
    found = []
    if torch_optimizer._global_optimizer_pre_hooks:
        found.append(f"{len(torch_optimizer._global_optimizer_pre_hooks)} global optimizer pre-hook(s)")
    if torch_optimizer._global_optimizer_post_hooks:
        found.append(f"{len(torch_optimizer._global_optimizer_post_hooks)} global optimizer post-hook(s)")
    for name, (owner, attr, original) in _ORIGINALS.items():
        if owner.__dict__[attr] is not original:
            found.append(f"{name} patched")
    return found


def run_arm(s: Setup, dataset: TensorDataset, arm: Arm, round_: int) -> RunResult:
    result = RunResult(arm.name, round_, update_every=arm.update_every)
    if arm.ema == "autolog":
        mlflow_ema.autolog(checkpoint_every_n_epochs=1, update_every=arm.update_every)
        if not torch_optimizer._global_optimizer_post_hooks:
            raise SystemExit("sanity check FAILED: autolog() installed no optimizer hook")
        try:
            train(s, dataset, result, arm)
        finally:
            mlflow_ema.autolog(disable=True)
    else:
        mlflow_ema.autolog(disable=True)
        if leftover := installed_hooks():
            raise SystemExit(f"sanity check FAILED: {arm.name} run with {', '.join(leftover)}")
        train(s, dataset, result, arm)
    return result


def warm_up(s: Setup, dataset: TensorDataset, steps: int) -> None:
    """Untimed steps of the same loop, no MLflow run: allocator, kernels and caches warm."""
    torch.manual_seed(SEED)
    model = build_model(s)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=s.batch_size, shuffle=True)
    done = 0
    while done < steps:
        for x, y in loader:
            x, y = x.to(s.device), y.to(s.device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break


class IsolatedUpdate:
    """``EMA.update()`` of a model of the same Setup timed alone: a warm loop of updates
    only, the model's and the EMA's weights staying in cache from one update to the next."""

    def __init__(self, s: Setup) -> None:
        torch.manual_seed(SEED)
        self.model = build_model(s)
        self.ema = mlflow_ema.EMA(self.model, decay=default_decay())
        self.ms: list[float] = []  # ms per update, one value per timing
        self.time()  # warm-up, not kept
        self.ms.clear()

    def time(self) -> None:
        _sync(self.model)
        start = time.perf_counter()
        for _ in range(ISOLATED_UPDATES):
            self.ema.update()
        _sync(self.model)
        self.ms.append(1e3 * (time.perf_counter() - start) / ISOLATED_UPDATES)


def run_rounds(
    s: Setup, dataset: TensorDataset, arms: list[Arm], rounds: int, isolated: IsolatedUpdate
) -> list[RunResult]:
    """``rounds`` runs of each arm, the order rotating every round; the isolated EMA update
    timed after each round."""
    runs: list[RunResult] = []
    for round_ in range(rounds):
        for arm in arms[round_ % len(arms) :] + arms[: round_ % len(arms)]:
            r = run_arm(s, dataset, arm, round_)
            runs.append(r)
            print(
                f"  round {round_ + 1} {r.arm}: {r.total_s:.2f} s, CPU {r.cpu_s:.2f} s, median step "
                f"{r.median_step:.2f} ms, {r.page_faults / len(r.all_steps):.0f} page faults per step, "
                f"{r.logged_models} LoggedModels",
                flush=True,
            )
        isolated.time()
    return runs


def load_average() -> str:
    """The machine may be shared: its load average when the benchmark starts and ends."""
    try:
        return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average unknown"


def native_threads() -> int | None:
    """OS threads of this process that Python did not start (torch's OpenMP workers...)."""
    try:
        return len(os.listdir("/proc/self/task")) - threading.active_count()
    except OSError:
        return None


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each OS thread of this process, from /proc (10 ms ticks)."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return found
    for tid in tids:
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        found[int(tid)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return found


def thread_kind(native_id: int | None = None) -> str:
    """Which of THREADS a thread is (default: the calling one)."""
    if native_id is None:
        native_id = threading.get_native_id()
    if native_id == threading.main_thread().native_id:
        return THREADS[0]
    if any(t.native_id == native_id for t in threading.enumerate() if t.name.startswith(UPLOADER_THREADS)):
        return THREADS[2]
    return THREADS[1]


def cpu_by_thread(before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    """CPU seconds between two :func:`thread_cpu` readings, by kind of thread (a thread that
    ended meanwhile is missing: the autolog threads live on, torch's OpenMP workers too)."""
    split = dict.fromkeys(THREADS, 0.0)
    for tid, seconds in after.items():
        split[thread_kind(tid)] += seconds - before.get(tid, 0.0)
    return split


# -- where B's CPU goes: one instrumented B run -----------------------------------------------

# (owner, attribute, label): the functions whose thread CPU the instrumented run adds up.
# "of which": part of the function above.
PROFILED: list[tuple[Any, str, str]] = [
    (Session, "resolve", "first step: model search + EMA init (Session.resolve)"),
    (Session, "before_step", "every step: pre-step hook (Session.before_step)"),
    (Session, "after_optimizer_step", "every step: EMA update (Session.after_optimizer_step)"),
    (Session, "on_epoch_end", "epoch ends: checkpoint taken (Session.on_epoch_end)"),
    (
        checkpointing,
        "architecture_folder",
        "of which the architecture (torch.export at the first checkpoint)",
    ),
    (checkpointing, "take_snapshot", "of which snapshots: CPU clones of the raw and EMA weights"),
    (run_end, "end_of_run", "run end (end_of_run: last checkpoint, waits for uploads)"),
    (uploader, "save_checkpoint", "save_checkpoint: the checkpoint folder"),
    (ckpt_module, "save_file", "of which safetensors save_file"),
    (ckpt_module, "_file_digest", "of which sha256 of the files"),
    (ckpt_module, "_finite", "of which the finite check (numpy)"),
    (ckpt_module, "_fsync", "of which fsync"),
    *(
        (MlflowClient, name, f"MlflowClient.{name}")
        for name in (
            "create_logged_model",
            "log_outputs",
            "log_model_artifacts",
            "finalize_logged_model",
            "log_batch",
            "set_tag",
            "log_artifacts",
            "get_run",
        )
    ),
]


class Profile:
    """Thread CPU and wall seconds spent in the PROFILED functions, by (label, thread kind)."""

    def __init__(self) -> None:
        self.totals: dict[tuple[str, str], list[float]] = {}  # -> [calls, CPU s, wall s]
        self._inside = threading.local()
        self._restore: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        original = vars(owner)[attr]
        inside, totals = self._inside, self.totals

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            active = inside.__dict__.setdefault("labels", set())
            if label in active:  # a recursive call (_finite): counted by the outer one
                return original(*args, **kwargs)
            active.add(label)
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                active.discard(label)
                entry = totals.setdefault((label, thread_kind()), [0, 0.0, 0.0])
                entry[0] += 1
                entry[1] += time.thread_time() - cpu
                entry[2] += time.perf_counter() - wall

        setattr(owner, attr, timed)
        self._restore.append((owner, attr, original))

    def restore(self) -> None:
        for owner, attr, original in reversed(self._restore):
            setattr(owner, attr, original)
        self._restore.clear()


def profile_run(s: Setup, dataset: TensorDataset) -> tuple[Profile, RunResult]:
    """One more B run, with the PROFILED functions timed (after the rounds: not in the ratios)."""
    profile = Profile()
    for owner, attr, label in PROFILED:
        if attr in vars(owner):  # checkpoint.py's parts change: profile those that exist
            profile.wrap(owner, attr, label)
    try:
        result = run_arm(s, dataset, ARM_B, -1)
    finally:
        profile.restore()
    return profile, result


# -- report -----------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def spread(values: list[float]) -> str:
    """``median [min-max]`` of ratios."""
    return f"{med(values):.3f} [{min(values):.3f}-{max(values):.3f}]" if values else "-"


def round_ratios(runs: list[RunResult], num: str, den: str, field: str, *, diff: bool = False) -> list[float]:
    """``field`` of arm ``num`` / of arm ``den`` (``diff``: minus), one value per round that ran both."""
    by_round: dict[int, dict[str, RunResult]] = {}
    for r in runs:
        by_round.setdefault(r.round, {})[r.arm] = r
    return [
        getattr(rs[num], field) - getattr(rs[den], field)
        if diff
        else getattr(rs[num], field) / getattr(rs[den], field)
        for _, rs in sorted(by_round.items())
        if num in rs and den in rs
    ]


def print_runs(runs: list[RunResult]) -> None:
    print("\n### runs, in order\n")
    print(
        "| # | round | arm | total s | CPU s | CPU s: training / other / upload thread | "
        "median step ms | page faults per step | epoch-end next() ms | run end ms | LoggedModels |"
    )
    print("|---:|---:|---|---:|---:|---|---:|---:|---|---:|---:|")
    for i, r in enumerate(runs, 1):
        ends = ", ".join(f"{v:.1f}" for v in r.epoch_end_ms)
        split = " / ".join(f"{r.thread_cpu[k]:.2f}" for k in THREADS)
        print(
            f"| {i} | {r.round + 1} | {r.arm} | {r.total_s:.2f} | {r.cpu_s:.2f} | {split} | "
            f"{r.median_step:.2f} | {r.page_faults / len(r.all_steps):.0f} | {ends} | {r.run_end_ms:.0f} | "
            f"{r.logged_models} |"
        )


def summary_rows(arms: dict[str, list[RunResult]]) -> list[tuple[str, list[float]]]:
    """(row name, one median per arm) for the summary table."""

    def col(fn: Callable[[list[RunResult]], float]) -> list[float]:
        return [fn(rs) for rs in arms.values()]

    def steps(rs: list[RunResult]) -> list[float]:
        return [v for r in rs for v in r.all_steps]

    return [
        ("median step (ms)", col(lambda rs: med(steps(rs)))),
        ("p90 step (ms)", col(lambda rs: p90(steps(rs)))),
        ("first step of a run (ms, median)", col(lambda rs: med([r.steps_ms[0][0] for r in rs]))),
        ("epoch-end next() (ms, median)", col(lambda rs: med([v for r in rs for v in r.epoch_end_ms]))),
        ("epoch-end next() (ms, max)", col(lambda rs: max(v for r in rs for v in r.epoch_end_ms))),
        (
            "checkpoint step = last step + epoch-end next() (ms, median)",
            col(lambda rs: med([v for r in rs for v in r.checkpoint_steps])),
        ),
        ("checkpoint step (ms, max)", col(lambda rs: max(v for r in rs for v in r.checkpoint_steps))),
        (
            "first step after a checkpoint (ms, median)",
            col(lambda rs: med([v for r in rs for v in r.after_checkpoint])),
        ),
        (
            "run end: `with` exit, uploads flushed (ms, median)",
            col(lambda rs: med([r.run_end_ms for r in rs])),
        ),
        ("total wall time per run (s, median)", col(lambda rs: med([r.total_s for r in rs]))),
        ("process CPU time per run (s, median)", col(lambda rs: med([r.cpu_s for r in rs]))),
        (
            "process CPU time / total wall time (threads busy, median)",
            col(lambda rs: med([r.cpu_s / r.total_s for r in rs])),
        ),
        *(
            (f"CPU of the {kind} (s, median)", col(lambda rs, k=kind: med([r.thread_cpu[k] for r in rs])))
            for kind in THREADS
        ),
        (
            "minor page faults per step (median)",
            col(lambda rs: med([r.page_faults / len(r.all_steps) for r in rs])),
        ),
        ("LoggedModels per run (median)", col(lambda rs: med([r.logged_models for r in rs]))),
    ]


def print_summary(s: Setup, arms: dict[str, list[RunResult]]) -> None:
    names = list(arms)
    pairs = [(AUTOLOG, BASELINE), (AUTOLOG, MANUAL), (MANUAL, BASELINE)]
    pairs += [(n, AUTOLOG) for n in names if n not in (BASELINE, AUTOLOG, MANUAL)]
    label = {BASELINE: "A", AUTOLOG: "B", MANUAL: "C"}
    print(
        f"\n### medians over {len(arms[BASELINE])} runs of each arm: {s.epochs} epochs x "
        f"{s.steps_per_epoch} steps per run\n"
    )
    heads = [f"{label.get(a, a[0])}/{label.get(b, b[0])}" for a, b in pairs]
    print(f"| | {' | '.join(names)} | {' | '.join(heads)} |")
    print(f"|---|{'---:|' * (len(names) + len(pairs))}")
    for name, values in summary_rows(arms):
        by = dict(zip(names, values, strict=True))
        ratios = [f"{by[a] / by[b]:.3f}" if by[b] > 0 else "-" for a, b in pairs]
        print(f"| {name} | {' | '.join(f'{v:.2f}' for v in values)} | {' | '.join(ratios)} |")


def print_rounds(runs: list[RunResult], extra: list[str]) -> dict[str, list[float]]:
    """Per-round ratios; returns them by column name."""
    columns = {
        "B/C CPU": round_ratios(runs, AUTOLOG, MANUAL, "cpu_s"),
        "B/C wall": round_ratios(runs, AUTOLOG, MANUAL, "total_s"),
        "C/A CPU": round_ratios(runs, MANUAL, BASELINE, "cpu_s"),
        "C/A wall": round_ratios(runs, MANUAL, BASELINE, "total_s"),
        "B/A CPU": round_ratios(runs, AUTOLOG, BASELINE, "cpu_s"),
        "B/A wall": round_ratios(runs, AUTOLOG, BASELINE, "total_s"),
        **{f"{name[0]}/B CPU": round_ratios(runs, name, AUTOLOG, "cpu_s") for name in extra},
        **{f"{name[0]}/B wall": round_ratios(runs, name, AUTOLOG, "total_s") for name in extra},
        "C-A median step ms": round_ratios(runs, MANUAL, BASELINE, "median_step", diff=True),
        "B-C median step ms": round_ratios(runs, AUTOLOG, MANUAL, "median_step", diff=True),
        **{
            f"B-{name[0]} median step ms": round_ratios(runs, AUTOLOG, name, "median_step", diff=True)
            for name in extra
        },
    }
    orders: dict[int, list[str]] = {}
    for r in runs:
        orders.setdefault(r.round, []).append(r.arm[0])
    print(
        "\n### per round: ratios of process CPU time and total wall time per run; median step differences\n"
    )
    print(f"| round | order | {' | '.join(columns)} |")
    print(f"|---:|---|{'---:|' * len(columns)}")
    for i, (round_, order) in enumerate(sorted(orders.items())):
        values = " | ".join(f"{v[i]:.3f}" for v in columns.values())
        print(f"| {round_ + 1} | {' '.join(order)} | {values} |")
    print(f"| median [min-max] | | {' | '.join(spread(v) for v in columns.values())} |")
    return columns


def print_where(s: Setup, arms: dict[str, list[RunResult]]) -> None:
    """B's extra wall time by part, against C (tracking) and against A (tracking + EMA)."""
    n_steps = s.epochs * s.steps_per_epoch

    def m(arm: str, fn: Callable[[RunResult], float]) -> float:
        return med([fn(r) for r in arms[arm]])

    per_run: list[tuple[str, Callable[[RunResult], float]]] = [
        (f"{n_steps} steps x median step difference", lambda r: n_steps * r.median_step),
        ("first step of the run (model search, EMA init)", lambda r: r.steps_ms[0][0]),
        (f"epoch ends: snapshots ({s.epochs} per run)", lambda r: sum(r.epoch_end_ms)),
        (
            f"first {AFTER} steps after each checkpoint, beyond the run's median step",
            lambda r: r.after_excess,
        ),
        ("run end: last upload flushed", lambda r: r.run_end_ms),
    ]
    total_a = m(BASELINE, lambda r: r.total_s)
    print(f"\n### where B's extra wall time goes (ms per run, median B - median C or A; {n_steps} steps)\n")
    print("| | B - C | B - A | B - A, of A's total |")
    print("|---|---:|---:|---:|")
    parts = [(name, m(AUTOLOG, fn) - m(MANUAL, fn), m(AUTOLOG, fn) - m(BASELINE, fn)) for name, fn in per_run]
    measured = [
        (
            "measured: median total B - median total of the other",
            1e3 * (m(AUTOLOG, lambda r: r.total_s) - m(MANUAL, lambda r: r.total_s)),
            1e3 * (m(AUTOLOG, lambda r: r.total_s) - total_a),
        )
    ]
    summed = [("sum of the above", sum(p[1] for p in parts), sum(p[2] for p in parts))]
    for name, vs_c, vs_a in [*parts, *summed, *measured]:
        print(f"| {name} | {vs_c:+.0f} | {vs_a:+.0f} | {vs_a / 1e3 / total_a:+.1%} |")
    cpu = {kind: m(AUTOLOG, lambda r, k=kind: r.thread_cpu[k]) - m(MANUAL, lambda r, k=kind: r.thread_cpu[k])
           for kind in THREADS}  # fmt: skip
    print(
        "\nB - C process CPU time by thread (s per run, medians): "
        + ", ".join(f"{k} {v:+.2f}" for k, v in cpu.items())
        + f"; process total {m(AUTOLOG, lambda r: r.cpu_s) - m(MANUAL, lambda r: r.cpu_s):+.2f}"
    )


def print_ema_cost(arms: dict[str, list[RunResult]], isolated: IsolatedUpdate) -> None:
    """What the EMA arithmetic costs inside training, against the same update timed alone;
    and, with a D arm, what averaging on every N-th step saves."""
    step = {name: med([v for r in rs for v in r.all_steps]) for name, rs in arms.items()}
    in_loop = [v for r in arms[MANUAL] for v in r.update_ms]
    alone = med(isolated.ms)
    print("\n### the EMA update inside training and alone (ms)\n")
    print("| | ms | x alone | of A's median step |")
    print("|---|---:|---:|---:|")
    for name, ms in [
        ("C - A: median step difference (the update and its cache effects on the step)", step[MANUAL] - step[BASELINE]),
        ("`ema.update()` timed inside C's loop (median over all steps)", med(in_loop)),
        ("`ema.update()` timed inside C's loop (p90)", p90(in_loop)),
        (f"`EMA.update()` alone, warm loop of {ISOLATED_UPDATES} updates (median of {len(isolated.ms)})", alone),
        ("B - A: median step difference (update + hooks)", step[AUTOLOG] - step[BASELINE]),
        ("B - C: median step difference (hooks)", step[AUTOLOG] - step[MANUAL]),
        *((f"{n[0]} - A: median step difference ({n[2:]})", step[n] - step[BASELINE]) for n in arms if n[0] == "D"),
        *((f"B - {n[0]}: what {n.split()[-1]} saves per step", step[AUTOLOG] - step[n]) for n in arms if n[0] == "D"),
    ]:  # fmt: skip
        print(f"| {name} | {ms:+.3f} | {ms / alone:.2f}x | {ms / step[BASELINE]:+.2%} |")
    print(
        f"\nEMA.update() alone: {alone:.3f} ms, timings {min(isolated.ms):.3f}-{max(isolated.ms):.3f} "
        f"(one after each round); A's median step {step[BASELINE]:.2f} ms"
    )


def print_profile(profile: Profile, result: RunResult, b_minus_c_cpu: float) -> None:
    order = {label: i for i, (_, _, label) in enumerate(PROFILED)}
    split = ", ".join(f"{k} {result.thread_cpu[k]:.2f}" for k in THREADS)
    print("\n### where the CPU of one instrumented B run goes (not in the ratios)\n")
    print(
        f"That run: total {result.total_s:.2f} s, process CPU {result.cpu_s:.2f} s (by thread, /proc: "
        f"{split}); B - C process CPU in the rounds: {b_minus_c_cpu:+.2f} s per run (median). Thread "
        "CPU time counts the calling thread only: the OpenMP workers that share a torch op "
        "(EMA update, clones) are not in it, the wall time is.\n"
    )
    print('| function ("of which": part of the one above) | thread | calls | thread CPU s | wall s |')
    print("|---|---|---:|---:|---:|")
    for (label, kind), (calls, cpu, wall) in sorted(profile.totals.items(), key=lambda kv: order[kv[0][0]]):
        print(f"| {label} | {kind} | {calls:.0f} | {cpu:.3f} | {wall:.3f} |")
    upload = sum(
        v[1]
        for (label, kind), v in profile.totals.items()
        if kind == THREADS[2] and not label.startswith("of which")
    )
    print(
        f"\nupload thread: {upload:.2f} s CPU in the functions above, {result.thread_cpu[THREADS[2]]:.2f} s "
        "in all (/proc)"
    )


def checks(
    s: Setup, arms: dict[str, list[RunResult]], columns: dict[str, list[float]], threads: tuple
) -> list[tuple[str, bool]]:
    expected = 2 * s.epochs
    tracked = [r for name, rs in arms.items() if name not in (BASELINE, MANUAL) for r in rs]
    plain = arms[BASELINE] + arms[MANUAL]
    b = arms[AUTOLOG]
    step_b = med([v for r in b for v in r.all_steps])
    ckpt_b = [v for r in b for v in r.checkpoint_steps]
    spike, cpu, wall = med(ckpt_b) / step_b, columns["B/C CPU"], columns["B/A wall"]
    found = [
        (
            f"sanity: every B (and D) run created {expected} READY LoggedModels (2 per epoch): "
            f"{[r.ready_models for r in tracked]} READY of {[r.logged_models for r in tracked]}",
            all(r.ready_models == r.logged_models == expected for r in tracked),
        ),
        (
            "sanity: autolog's EMA saw every step of every B (and D) run, averaging every "
            f"update_every-th: {[(r.ema_steps, r.ema_updates) for r in tracked]}",
            all(r.ema_steps == len(r.all_steps) and r.ema_updates == r.ema_steps // r.update_every for r in tracked),
        ),
        (
            f"sanity: C's EMA was updated at every step: {[r.ema_updates for r in arms[MANUAL]]}",
            all(r.ema_updates == r.ema_steps == len(r.all_steps) == len(r.update_ms) for r in arms[MANUAL]),
        ),
        (
            f"sanity: A and C runs created no LoggedModel: {[r.logged_models for r in plain]}",
            all(r.logged_models == 0 for r in plain),
        ),
        (f"B/C process CPU time <= {CPU_TARGET} (median over {len(cpu)} rounds): {spread(cpu)}", med(cpu) <= CPU_TARGET),
        (
            f"total wall time B/A - 1 <= {TOTAL_TARGET:.0%} (median over {len(wall)} rounds): {med(wall) - 1:+.1%} "
            f"[{min(wall) - 1:+.1%} to {max(wall) - 1:+.1%}]",
            med(wall) - 1 <= TOTAL_TARGET,
        ),
        (
            f"checkpoint step <= {SPIKE_TARGET:g}x median step (B, median over {len(ckpt_b)} checkpoints): {spike:.2f}x",
            spike <= SPIKE_TARGET,
        ),
    ]  # fmt: skip
    before, after = threads
    if before is not None and after is not None:
        found.insert(
            4,
            (
                "sanity: autolog(disable=True) left no native thread behind (such as the OpenMP "
                "workers of a torch op run on the uploader thread, which slow every later step): "
                f"{before} before the first run, {after} after the last",
                after <= before,
            ),
        )
    return found


def report(
    s: Setup, runs: list[RunResult], isolated: IsolatedUpdate, threads: tuple, profiled: Any
) -> list[tuple[str, bool]]:
    arms: dict[str, list[RunResult]] = {}
    for r in runs:
        arms.setdefault(r.arm, []).append(r)
    arms = {name: arms[name] for name in sorted(arms)}  # A, B, C, D
    print_runs(runs)
    print_summary(s, arms)
    columns = print_rounds(runs, [n for n in arms if n[0] == "D"])
    print_where(s, arms)
    print_ema_cost(arms, isolated)
    if profiled is not None:
        cpu_b_c = med([r.cpu_s for r in arms[AUTOLOG]]) - med([r.cpu_s for r in arms[MANUAL]])
        print_profile(*profiled, cpu_b_c)
    a = arms[BASELINE]
    later = [r.median_step for r in a[1:]]
    if later:
        print(
            f"\nbaseline before / after autolog: median step of the first A run (before autolog was ever "
            f"enabled) {a[0].median_step:.1f} ms, of the later A runs {med(later):.1f} ms "
            f"({med(later) / a[0].median_step:.2f}x; one run before, so noisy)"
        )
    spread_a = (max(r.total_s for r in a) - min(r.total_s for r in a)) / 2 / med([r.total_s for r in a])
    print(f"noise: the {len(a)} A runs' total wall times spread +-{spread_a:.1%} around their median\n")
    return checks(s, arms, columns, threads)


# -- main -------------------------------------------------------------------------------


def _sync(model: nn.Module) -> None:
    """Wait for the GPU's queued kernels (nothing to wait for on the CPU)."""
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", "--pairs", type=int, default=5, help="rounds, one run of each arm per round (default 5)"
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3)")
    parser.add_argument(
        "--steps",
        type=int,
        default=256,
        help="steps per epoch = per checkpoint (default 256: see the docstring)",
    )
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument(
        "--update-every", type=int, default=None, metavar="N", help="add arm D: autolog(update_every=N)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model trains")
    parser.add_argument("--no-profile", action="store_true", help="skip the instrumented B run")
    parser.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's dynamic malloc thresholds (noisy)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 round of 2 x 16-step epochs: a smoke run, not a measurement"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.epochs, args.steps = 1, 2, 16
    if args.steps <= AFTER:
        parser.error(f"--steps must be more than {AFTER}")
    if args.update_every is not None and args.update_every < 2:
        parser.error("--update-every must be 2 or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return args


def pin_malloc(args: argparse.Namespace) -> None:
    """Re-run this script with glibc's malloc thresholds fixed, unless told not to or set
    already (glibc reads them at start-up only)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if args.default_malloc or "glibc.malloc." in tunables or not sys.platform.startswith("linux"):
        return
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, MALLOC_TUNABLES]))}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> int:
    args = parse_args()
    pin_malloc(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Setup(batch_size=args.batch_size, steps_per_epoch=args.steps, epochs=args.epochs, device=args.device)
    arms = [ARM_A, ARM_B, ARM_C]
    if args.update_every:
        arms.append(Arm(f"D autolog update_every={args.update_every}", "autolog", args.update_every))
    model = build_model(s)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, device {s.device}; "
        f"mlflow {mlflow.__version__}; MLP {s.in_features}-{s.hidden}x{s.depth}-{s.classes}: "
        f"{sum(p.numel() for p in model.parameters()):,} parameters in {len(list(model.parameters()))} "
        f"tensors; batch {s.batch_size}; {args.rounds} rounds of {len(arms)} runs ({', '.join(a.name for a in arms)}) "
        f"of {s.epochs} epochs x {s.steps_per_epoch} steps; {load_average()}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES') or '(unset)'}"
    )
    del model
    dataset = build_data(s)
    home = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="mlflow-ema-bench-") as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        try:
            mlflow.set_experiment("training_overhead")  # creates the store: not timed
            warm_up(s, dataset, steps=2 * s.steps_per_epoch)
            isolated = IsolatedUpdate(s)
            threads_before = native_threads()
            runs = run_rounds(s, dataset, arms, args.rounds, isolated)
            profiled = None if args.no_profile else profile_run(s, dataset)
        finally:
            os.chdir(home)
    threads_after = native_threads()
    print(f"\n{load_average()} at the end")
    results = report(s, runs, isolated, (threads_before, threads_after), profiled)
    return print_verdicts(results, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
