"""Benchmark: what autolog's per-step hooks cost beyond the EMA update, on a tiny model.

On a tiny model a training step takes a few hundred microseconds, so the fixed per-step
cost of autolog's machinery (torch's global optimizer hooks -> the safety boundary ->
``Session.after_optimizer_step`` -> ``update_emas``: the EMA update, ``active_run()`` (MLflow's
thread-local active run and an identity check: the run id and the tracking URI are resolved once
per run), the step counters) shows, where on a real model it is lost in the step. The same loop (an MLP
64-64-10 of ~4.8k parameters in 4 tensors; per step: forward, cross-entropy, backward,
``AdamW.step()``; batches of 32 built once, no ``DataLoader``) runs inside
``with mlflow.start_run():`` on a sqlite store in a temporary folder, in five arms:

- ``0 no EMA``: the loop alone;
- ``a manual EMA``: ``ema = mlflow_ema.EMA(model, decay=<autolog's default schedule>)`` and
  ``ema.update()`` after every ``optimizer.step()``: the reference;
- ``b autolog``: ``mlflow_ema.autolog(checkpoint_at_end=False)``: the global optimizer hooks
  find the model at the first step and update its EMA after every step (no checkpoint);
- ``c watch``: ``mlflow_ema.watch(model, optimizer)``: the optimizer's own step hooks
  update the EMA (no search for the model). ``watch`` takes autolog's configuration, so the
  script sets ``autolog(checkpoint_at_end=False)`` and disables it again first: no
  checkpoint at the run's end either;
- ``d plain hook``: ``optimizer.register_step_post_hook(lambda *_: ema.update())``: the
  same update from torch's hook machinery, without mlflow-ema's (c - d and b - d: what
  mlflow-ema's own hook path costs).

The arms run in interleaved rounds (the order rotating every round), each run a fresh model
from the same seed on the same batches. Per run, the first step (model discovery and EMA
init for ``b``) is timed on its own; the other steps are timed each (their median: what a
step costs when the machine's other load does not interrupt it; also the median of their
update part alone: ``optimizer.step()`` with its hooks, and in arm a ``ema.update()``,
the rest being zero_grad, forward and backward) and together (the mean, as
wall time with ``perf_counter`` and as process CPU time), in microseconds per step. The
hooks' cost is b - a (and c - a) per round, paired, reported as the median over the rounds
with its min and max.

torch runs with one intra-op thread by default (``--threads``): a model this small gains
nothing from a second one, and on a shared 2-core machine every parallel region of a step
may wait for an OpenMP worker the other load has descheduled (steps of 0.4 to 10 ms instead
of 0.3, in bursts), a noise far above what is measured here.

Then, on the same process: ``EMA.update()`` of the tiny model alone (a warm loop); the
``_BaseDataLoaderIter.__next__`` patch autolog installs for epoch detection, as
microseconds per ``next()`` with autolog on and off (a loop that only iterates a
``DataLoader``, interleaved); and the hook path's parts (watch's two step hooks, the
``active_run()`` they call and its parts, ``EMA.update()``), each call timed alone right
after a training step (the caches as the hook finds them) and in a warm loop of calls only:
what cache effects add.

Target: b - a at most 30 microseconds per step (the median step; median over the rounds).
Sanity checks: the EMA saw every step in the a, b, c and d arms, and no run logged a model.

Run from the repository root (about 2 minutes; ``--quick`` for a short smoke run)::

    .venv/bin/python benchmarks/hooks_overhead.py [--rounds 20] [--steps 2000] [--threads 1] [--quick]

Exits with status 1 if a sanity check or the target fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
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
from torch.utils.data import DataLoader, TensorDataset

import mlflow_ema
from mlflow_ema import checkpointing
from mlflow_ema.options import default_decay

NONE, MANUAL, AUTOLOG, WATCH, PLAIN = "0 no EMA", "a manual EMA", "b autolog", "c watch", "d plain hook"
ARMS = (NONE, MANUAL, AUTOLOG, WATCH, PLAIN)
TARGET_US = 30.0  # b - a, microseconds per step
SEED = 0
BATCH, FEATURES, HIDDEN, CLASSES, BATCHES = 32, 64, 64, 10, 64


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def build_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED)
    return [
        (torch.randn(BATCH, FEATURES, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g))
        for _ in range(BATCHES)
    ]


@dataclasses.dataclass
class Run:
    arm: str
    round: int
    first_us: float = 0.0  # the first step
    median_us: float = 0.0  # median step, the others
    update_us: float = 0.0  # median of its update part: optimizer.step() (+ hooks, + ema.update())
    wall_us: float = 0.0  # mean wall time per step, the others
    cpu_us: float = 0.0  # process CPU time per step, the others
    ema_steps: int | None = None
    logged_models: int = 0


def step_fns(model: nn.Module, optimizer: Any, ema: Any) -> tuple[Callable, Callable[[], None]]:
    """A training step in two parts: zero_grad + forward + backward, then the update (the
    optimizer's step, its hooks, and in arm a ``ema.update()``)."""

    def forward_backward(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def update() -> None:
        optimizer.step()
        if ema is not None:
            ema.update()

    return forward_backward, update


def timed_loop(fns: tuple[Callable, Callable[[], None]], batches: list, steps: int, run: Run) -> None:
    """The first step on its own, then steps 2..``steps``: each, and all of them together."""
    forward_backward, update = fns
    clock = time.perf_counter
    start = clock()
    forward_backward(*batches[0])
    update()
    run.first_us = 1e6 * (clock() - start)
    times, updates = [], []
    start, cpu = clock(), time.process_time()
    for i in range(1, steps):
        t0 = clock()
        forward_backward(*batches[i % len(batches)])
        t1 = clock()
        update()
        t2 = clock()
        times.append(t2 - t0)
        updates.append(t2 - t1)
    run.wall_us = 1e6 * (clock() - start) / (steps - 1)
    run.cpu_us = 1e6 * (time.process_time() - cpu) / (steps - 1)
    run.median_us = 1e6 * statistics.median(times)
    run.update_us = 1e6 * statistics.median(updates)


def run_arm(arm: str, round_: int, batches: list, steps: int) -> Run:
    run = Run(arm, round_)
    torch.manual_seed(SEED)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mlflow_ema.autolog(disable=True)
    ema = None
    if arm == AUTOLOG:
        mlflow_ema.autolog(checkpoint_at_end=False)
    elif arm == WATCH:
        mlflow_ema.autolog(checkpoint_at_end=False)  # watch() uses autolog's configuration
        mlflow_ema.autolog(disable=True)
    try:
        with mlflow.start_run() as active:
            if arm in (MANUAL, PLAIN):
                ema = mlflow_ema.EMA(model, decay=default_decay())
            if arm == PLAIN:  # the update from torch's hook machinery, without mlflow-ema's
                optimizer.register_step_post_hook(lambda *_: ema.update())
            elif arm == WATCH:
                ema = mlflow_ema.watch(model, optimizer)
            timed_loop(step_fns(model, optimizer, ema if arm == MANUAL else None), batches, steps, run)
            if arm == AUTOLOG:
                ema = mlflow_ema.get_ema(model)
            run.ema_steps = ema.step if ema is not None else None
    finally:
        mlflow_ema.autolog(disable=True)
    run.logged_models = len(
        MlflowClient().search_logged_models(
            experiment_ids=[active.info.experiment_id],
            filter_string=f"source_run_id = '{active.info.run_id}'",
        )
    )
    return run


def run_rounds(rounds: int, steps: int, batches: list) -> list[Run]:
    runs = []
    for round_ in range(rounds):
        for arm in ARMS[round_ % len(ARMS) :] + ARMS[: round_ % len(ARMS)]:
            runs.append(run_arm(arm, round_, batches, steps))
        print(
            f"  round {round_ + 1}: "
            + ", ".join(
                f"{r.arm} {r.median_us:.1f} us" for r in sorted(runs[-len(ARMS) :], key=lambda r: r.arm)
            ),
            flush=True,
        )
    return runs


# -- the smaller measurements -----------------------------------------------------------


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - start) / calls


def ema_alone_us(rounds: int) -> list[float]:
    """``EMA.update()`` of the tiny model, a warm loop of updates only (one value per round)."""
    torch.manual_seed(SEED)
    ema = mlflow_ema.EMA(build_model(), decay=default_decay())
    per_call_us(ema.update, 200)
    return [per_call_us(ema.update, 1000) for _ in range(rounds)]


def data_loader_us(rounds: int) -> dict[str, list[float]]:
    """Microseconds per ``next()`` of a DataLoader iterator, autolog's patch on and off."""
    g = torch.Generator().manual_seed(SEED)
    dataset = TensorDataset(torch.randn(BATCH * BATCHES, FEATURES, generator=g), torch.zeros(BATCH * BATCHES))
    loader = DataLoader(dataset, batch_size=BATCH)

    def epochs() -> None:
        for _ in range(5):
            for _ in loader:
                pass

    samples: dict[str, list[float]] = {"autolog off": [], "autolog on": []}
    for round_ in range(rounds):
        for name in sorted(samples, reverse=bool(round_ % 2)):
            if name == "autolog on":
                mlflow_ema.autolog(checkpoint_at_end=False)
            try:
                samples[name].append(per_call_us(epochs, 4) / (5 * (BATCHES + 1)))
            finally:
                mlflow_ema.autolog(disable=True)
    return samples


def hook_path_us(steps: int) -> dict[str, tuple[float, float]]:
    """The hook path's parts, each call timed alone (median us): right after a training step
    of the bare loop (the cache as the hook finds it), and in a warm loop of calls only. The
    hooks are those of a second, watched copy of the model: called by hand, they update its
    EMA as ``optimizer.step()`` would."""
    torch.manual_seed(SEED)
    model, other = build_model(), build_model()
    optimizer, other_optimizer = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, other))
    fns, batches, clock = step_fns(model, optimizer, None), build_batches(), time.perf_counter
    mlflow_ema.autolog(checkpoint_at_end=False)  # watch() uses autolog's configuration
    mlflow_ema.autolog(disable=True)
    try:
        with mlflow.start_run():
            watched = mlflow_ema.watch(other, other_optimizer)
            hooks = [
                *other_optimizer._optimizer_step_pre_hooks.values(),
                *other_optimizer._optimizer_step_post_hooks.values(),
            ]
            calls = {
                "EMA.update()": watched.update,
                "watch()'s two step hooks (the update and the session's bookkeeping)": lambda: [
                    hook(other_optimizer, (), {}) for hook in hooks
                ],
                "mlflow_ema.checkpointing.active_run() (in the post hook)": checkpointing.active_run,
                "of which mlflow.active_run()": mlflow.active_run,
                "mlflow.get_tracking_uri() (once per run since issue 15, no longer per step)": mlflow.get_tracking_uri,
                "os.environ.get('MLFLOW_TRACKING_URI')": lambda: os.environ.get("MLFLOW_TRACKING_URI"),
            }
            found = {}
            for name, fn in calls.items():
                after_step, warm = [], []
                for i in range(steps):
                    fns[0](*batches[i % len(batches)])
                    fns[1]()
                    t0 = clock()
                    fn()
                    after_step.append(clock() - t0)
                for _ in range(steps):
                    t0 = clock()
                    fn()
                    warm.append(clock() - t0)
                found[name] = (1e6 * statistics.median(after_step), 1e6 * statistics.median(warm))
            return found
    finally:
        mlflow_ema.autolog(disable=True)


# -- report -----------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f} to {max(values):.1f}]"


def paired(runs: list[Run], arm: str, ref: str, field: str) -> list[float]:
    """``field`` of ``arm`` minus ``field`` of ``ref``, per round."""
    by: dict[tuple[int, str], Run] = {(r.round, r.arm): r for r in runs}
    rounds = sorted({r.round for r in runs})
    return [getattr(by[(i, arm)], field) - getattr(by[(i, ref)], field) for i in rounds]


def print_arms(runs: list[Run]) -> None:
    fields = ("median_us", "update_us", "wall_us", "cpu_us", "first_us")
    print("\n### microseconds per step (steps 2..N of each run; median [min to max] over the rounds)\n")
    head = "median step | its update part (median) | mean step (wall) | mean step (process CPU) | first step"
    print(f"| arm | {head} |")
    print("|---|---:|---:|---:|---:|---:|")
    for arm in ARMS:
        rs = [r for r in runs if r.arm == arm]
        print(f"| {arm} | {' | '.join(spread([getattr(r, f) for r in rs]) for f in fields)} |")
    print("\n### differences per round, paired (us per step; median [min to max] over the rounds)\n")
    print(f"| | {head} |")
    print("|---|---:|---:|---:|---:|---:|")
    for arm, ref, name in [
        (MANUAL, NONE, "a - 0: the EMA update, called by hand"),
        (AUTOLOG, MANUAL, "b - a: autolog's hooks beyond the update"),
        (WATCH, MANUAL, "c - a: watch()'s hooks beyond the update"),
        (AUTOLOG, WATCH, "b - c: the global hooks against watch()'s"),
        (PLAIN, MANUAL, "d - a: a bare torch post-step hook calling the update"),
        (WATCH, PLAIN, "c - d: mlflow-ema's hook path beyond a bare hook"),
        (AUTOLOG, PLAIN, "b - d: autolog's hook path beyond a bare hook"),
    ]:
        print(f"| {name} | {' | '.join(spread(paired(runs, arm, ref, f)) for f in fields)} |")


def print_extras(
    alone: list[float], loader: dict[str, list[float]], lookups: dict[str, tuple[float, float]]
) -> None:
    print(f"\n`EMA.update()` of the tiny model alone (warm loop): {spread(alone)} us per call")
    diff = [on - off for on, off in zip(loader["autolog on"], loader["autolog off"], strict=True)]
    print(
        "DataLoader `next()` (a loop that only iterates): autolog off "
        f"{spread(loader['autolog off'])} us, on {spread(loader['autolog on'])} us; "
        f"the patch adds {spread(diff)} us per batch (paired by round)"
    )
    print("\nthe hook path's parts, one call timed alone (median us per call):\n")
    print("| call | right after a training step | warm loop of calls only | ratio |")
    print("|---|---:|---:|---:|")
    for name, (cold, warm) in lookups.items():
        print(f"| {name} | {cold:.2f} | {warm:.2f} | {cold / warm:.1f}x |")


def checks(runs: list[Run], steps: int) -> list[tuple[str, bool]]:
    hooks = paired(runs, AUTOLOG, MANUAL, "median_us")
    tracked = [r for r in runs if r.arm != NONE]
    return [
        (
            f"sanity: the EMA saw every step of every a, b, c and d run: {sorted({r.ema_steps for r in tracked})} "
            f"(expected {steps})",
            all(r.ema_steps == steps for r in tracked),
        ),
        (
            f"sanity: no run logged a model: {sorted({r.logged_models for r in runs})}",
            all(r.logged_models == 0 for r in runs),
        ),
        (
            f"autolog's hooks beyond the EMA update (b - a, median step) <= {TARGET_US:g} us per step "
            f"(median over {len(hooks)} rounds): {spread(hooks)} us",
            statistics.median(hooks) <= TARGET_US,
        ),
    ]


# -- main -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the five arms (default 20)")
    parser.add_argument("--steps", type=int, default=2000, help="steps per run (default 2000)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: see the docstring)"
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds of 200 steps: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds, steps = (3, 200) if args.quick else (args.rounds, args.steps)
    model = build_model()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; mlflow "
        f"{mlflow.__version__}; MLP {FEATURES}-{HIDDEN}-{CLASSES}: {sum(p.numel() for p in model.parameters()):,} "
        f"parameters in {len(list(model.parameters()))} tensors; batch {BATCH}; {rounds} rounds of "
        f"{len(ARMS)} runs of {steps} steps; load average "
        + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    )
    batches = build_batches()
    home = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="mlflow-ema-bench-") as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        try:
            mlflow.set_experiment("hooks_overhead")  # creates the store: not timed
            run_arm(MANUAL, -1, batches, min(steps, 200))  # warm-up, not kept
            runs = run_rounds(rounds, steps, batches)
            alone = ema_alone_us(rounds)
            loader = data_loader_us(rounds)
            lookups = hook_path_us(steps)
        finally:
            os.chdir(home)
    print("\nload average at the end " + " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    print_arms(runs)
    print_extras(alone, loader, lookups)
    print()
    return print_verdicts(checks(runs, steps), quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
