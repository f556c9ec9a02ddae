"""Benchmark: what ``mlflow_ema.autolog()`` costs a real CPU training loop, end to end.

The same loop (an MLP of ~5.9M parameters built from ``torch.nn``, synthetic inputs and
labels from a ``TensorDataset`` through a ``DataLoader``; per step: forward, cross-entropy,
backward, ``AdamW.step()``) runs in one process, inside ``with mlflow.start_run():`` on a
sqlite store in a temporary folder, in two variants:

- ``A baseline``: no mlflow-ema. Before each A run the script checks that no global
  optimizer hook, ``DataLoader`` patch or ``MlflowClient`` patch is left installed;
- ``B autolog``: ``mlflow_ema.autolog(checkpoint_every_n_epochs=1)``: an EMA update after
  every optimizer step and a raw + EMA checkpoint (two LoggedModels) at every epoch end,
  snapshotted on the training thread and written / uploaded on the background thread.
  ``mlflow_ema.autolog(disable=True)`` after each B run removes it again.

After an untimed warm-up the variants alternate in pairs whose order flips (A B, B A,
A B, ...) so that a slow drift of the machine's load hits both alike; every run trains a
fresh model from the same seed on the same batches, and logs its mean loss once per epoch
with ``mlflow.log_metric`` as a training script would.

What is timed, with ``time.perf_counter``:

- every training step: the ``next()`` that fetches the batch, forward, loss, backward and
  ``optimizer.step()`` (hence autolog's optimizer hooks and the EMA update);
- the epoch end, separately: the ``next()`` on the exhausted ``DataLoader`` iterator that
  raises ``StopIteration``. This is where autolog detects the epoch and takes the
  checkpoint snapshot (a CPU clone of the raw and EMA weights, then the queue ``put``).
  The "checkpoint step" is the epoch's last step plus this call: the iteration of the
  loop that includes the epoch end;
- the first steps after each checkpoint, which share the two cores with the background
  thread writing and uploading it;
- the whole run, from ``mlflow.start_run()`` to the end of its ``with`` block, whose exit
  takes the last checkpoint and waits until every checkpoint is uploaded (also as process
  CPU time, all threads, which the machine's other load disturbs less than wall time).

Targets: total wall time of B at most 5% above A (median over the pairs of B/A), and the
checkpoint step at most 2x the median step of B (median over the checkpoints). Sanity
checks: every B run created 2 READY LoggedModels per epoch and updated its EMA at every
step; A runs created none; and ``autolog(disable=True)`` left no native thread behind (OS
threads Python did not start, counted before the first run and after the last). A torch op
run on the uploader thread starts a second OpenMP team, after which every step of the
process is slower, A runs included: the B/A comparison would hide that cost. The first run
is an A run before autolog was ever enabled; its median step against the later A runs' is
printed too (one run only, so noisy: not a check).

Run from the repository root (about 2-3 minutes; ``--quick`` for a short smoke run)::

    .venv/bin/python benchmarks/training_overhead.py [--pairs 3] [--epochs 5] [--quick]

Exits with status 1 if a sanity check or a target fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

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

BASELINE = "A baseline"
AUTOLOG = "B autolog"
TOTAL_TARGET = 0.05  # B total wall time at most 5% above A
SPIKE_TARGET = 2.0  # checkpoint step at most 2x the median step
AFTER = 10  # steps after a checkpoint that may share the cores with its upload
SEED = 0

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


# -- the training loop ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    in_features: int = 512
    hidden: int = 1024
    depth: int = 6  # Linear layers of width `hidden`
    classes: int = 100
    batch_size: int = 128
    steps_per_epoch: int = 64
    epochs: int = 5


def build_model(s: Setup) -> nn.Module:
    """An MLP of ~5.9M parameters in 14 tensors (default Setup)."""
    layers: list[nn.Module] = [nn.Linear(s.in_features, s.hidden), nn.GELU()]
    for _ in range(s.depth - 1):
        layers += [nn.Linear(s.hidden, s.hidden), nn.GELU()]
    layers.append(nn.Linear(s.hidden, s.classes))
    return nn.Sequential(*layers)


def build_data(s: Setup) -> TensorDataset:
    g = torch.Generator().manual_seed(SEED)
    n = s.batch_size * s.steps_per_epoch
    return TensorDataset(
        torch.randn(n, s.in_features, generator=g), torch.randint(0, s.classes, (n,), generator=g)
    )


@dataclasses.dataclass
class RunResult:
    variant: str
    steps_ms: list[list[float]] = dataclasses.field(default_factory=list)  # per epoch, per step
    epoch_end_ms: list[float] = dataclasses.field(default_factory=list)  # the StopIteration next()
    run_end_ms: float = 0.0  # exit of the `with mlflow.start_run()` block (uploads flushed)
    total_s: float = 0.0  # start_run() to the end of its block
    cpu_s: float = 0.0  # process CPU time (all threads) over the same span
    logged_models: int = 0
    ready_models: int = 0
    ema_steps: int | None = None

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


def train(s: Setup, dataset: TensorDataset, result: RunResult, *, with_ema: bool) -> None:
    torch.manual_seed(SEED)
    model = build_model(s)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loader = DataLoader(
        dataset, batch_size=s.batch_size, shuffle=True, generator=torch.Generator().manual_seed(SEED)
    )
    step = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    with mlflow.start_run() as run:
        for _ in range(s.epochs):
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
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item()
                times.append(1e3 * (time.perf_counter() - t0))
                step += 1
            result.steps_ms.append(times)
            mlflow.log_metric("train_loss", loss_sum / len(times), step=step)
        if with_ema:
            result.ema_steps = mlflow_ema.get_ema(model).step
        exit_start = time.perf_counter()
    end, cpu_end = time.perf_counter(), time.process_time()
    result.run_end_ms = 1e3 * (end - exit_start)
    result.total_s = end - start
    result.cpu_s = cpu_end - cpu_start
    models = MlflowClient().search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    result.logged_models = len(models)
    result.ready_models = sum(str(m.status).endswith("READY") for m in models)


# -- hooks: installed for B, none for A --------------------------------------------------


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


def run_variant(s: Setup, dataset: TensorDataset, variant: str) -> RunResult:
    result = RunResult(variant)
    if variant == AUTOLOG:
        mlflow_ema.autolog(checkpoint_every_n_epochs=1)
        if not torch_optimizer._global_optimizer_post_hooks:
            raise SystemExit("sanity check FAILED: autolog() installed no optimizer hook")
        try:
            train(s, dataset, result, with_ema=True)
        finally:
            mlflow_ema.autolog(disable=True)
    else:
        mlflow_ema.autolog(disable=True)
        if leftover := installed_hooks():
            raise SystemExit(f"sanity check FAILED: baseline run with {', '.join(leftover)}")
        train(s, dataset, result, with_ema=False)
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
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break


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


# -- report -----------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def print_runs(runs: list[RunResult]) -> None:
    print("\n### runs, in order\n")
    print(
        "| # | variant | total s | CPU s | median step ms | epoch-end next() ms | run end ms | LoggedModels |"
    )
    print("|---:|---|---:|---:|---:|---|---:|---:|")
    for i, r in enumerate(runs, 1):
        ends = ", ".join(f"{v:.1f}" for v in r.epoch_end_ms)
        print(
            f"| {i} | {r.variant} | {r.total_s:.2f} | {r.cpu_s:.2f} | {r.median_step:.2f} | {ends} | "
            f"{r.run_end_ms:.0f} | {r.logged_models} |"
        )


def report(s: Setup, runs: list[RunResult], threads: tuple[int | None, int | None]) -> list[tuple[str, bool]]:
    a = [r for r in runs if r.variant == BASELINE]
    b = [r for r in runs if r.variant == AUTOLOG]
    print_runs(runs)

    def both(fn) -> tuple[float, float]:
        return fn(a), fn(b)

    step_a, step_b = both(lambda rs: med([v for r in rs for v in r.all_steps]))
    ckpt_a, ckpt_b = ([v for r in rs for v in r.checkpoint_steps] for rs in (a, b))
    total_a, total_b = both(lambda rs: med([r.total_s for r in rs]))
    rows = [
        ("median step (ms)", step_a, step_b),
        ("p90 step (ms)", *both(lambda rs: p90([v for r in rs for v in r.all_steps]))),
        ("first step of a run (ms, median)", *both(lambda rs: med([r.steps_ms[0][0] for r in rs]))),
        ("epoch-end next() (ms, median)", *both(lambda rs: med([v for r in rs for v in r.epoch_end_ms]))),
        ("epoch-end next() (ms, max)", *both(lambda rs: max(v for r in rs for v in r.epoch_end_ms))),
        ("checkpoint step = last step + epoch-end next() (ms, median)", med(ckpt_a), med(ckpt_b)),
        ("checkpoint step (ms, max)", max(ckpt_a), max(ckpt_b)),
        (
            "first step after a checkpoint (ms, median)",
            *both(lambda rs: med([v for r in rs for v in r.after_checkpoint])),
        ),
        (
            "run end: `with` exit, uploads flushed (ms, median)",
            *both(lambda rs: med([r.run_end_ms for r in rs])),
        ),
        ("total wall time per run (s, median)", total_a, total_b),
        ("process CPU time per run (s, median)", *both(lambda rs: med([r.cpu_s for r in rs]))),
        ("LoggedModels per run (median)", *both(lambda rs: med([r.logged_models for r in rs]))),
    ]
    print(
        f"\n### {len(a)} x {BASELINE} vs {len(b)} x {AUTOLOG}: {s.epochs} epochs x "
        f"{s.steps_per_epoch} steps per run\n"
    )
    print(f"| | {BASELINE} | {AUTOLOG} | B/A |")
    print("|---|---:|---:|---:|")
    for name, va, vb in rows:
        print(f"| {name} | {va:.2f} | {vb:.2f} | {f'{vb / va:.2f}x' if va > 0 else '-'} |")

    n_steps = s.epochs * s.steps_per_epoch
    per_run = [
        ("first step of the run (model search, EMA init)", lambda r: r.steps_ms[0][0]),
        (f"epoch ends: snapshots ({s.epochs} per run)", lambda r: sum(r.epoch_end_ms)),
        (
            f"first {AFTER} steps after each checkpoint, beyond the run's median step",
            lambda r: r.after_excess,
        ),
        ("run end: last upload flushed", lambda r: r.run_end_ms),
    ]
    parts = [
        (f"EMA update and hooks: {n_steps} steps x median step difference", n_steps * (step_b - step_a)),
        *((name, med([fn(r) for r in b]) - med([fn(r) for r in a])) for name, fn in per_run),
    ]
    print(
        f"\n### where B's extra wall time goes (ms per run, median B - median A; runs of {n_steps} steps)\n"
    )
    print("| | ms per run | of A's total |")
    print("|---|---:|---:|")
    for name, ms in [
        *parts,
        ("sum of the above", sum(ms for _, ms in parts)),
        ("measured: median total B - median total A", 1e3 * (total_b - total_a)),
    ]:
        print(f"| {name} | {ms:+.0f} | {ms / 1e3 / total_a:+.1%} |")

    ratios = [rb.total_s / ra.total_s for ra, rb in zip(a, b, strict=True)]
    overhead = med(ratios) - 1
    spike = med(ckpt_b) / step_b
    after = med([v for r in b for v in r.after_checkpoint]) / step_b
    spread = (max(r.total_s for r in a) - min(r.total_s for r in a)) / 2 / total_a
    print(
        f"\nper step, B costs {step_b - step_a:+.2f} ms ({step_b / step_a - 1:+.1%}); "
        f"per run, B/A - 1 by pair: {', '.join(f'{x - 1:+.1%}' for x in ratios)}, "
        f"ratio of the medians {total_b / total_a - 1:+.1%}; checkpoint step / median step of B: "
        f"median {spike:.2f}x, max {max(ckpt_b) / step_b:.2f}x; first step after a checkpoint / "
        f"median step of B: {after:.2f}x (the background thread at work; not a target)"
    )
    if len(a) > 1:
        print(
            f"noise: the {len(a)} A runs' total wall times spread +-{spread:.1%} around their median "
            "(the same work): overheads much smaller than that are not resolved"
        )
    print()

    # The first run is an A run before autolog was ever enabled in this process: the later A
    # runs show whether autolog(disable=True) left something behind that slows training down.
    later = [r.median_step for r in a[1:]]
    if later:
        print(
            f"baseline before / after autolog: median step of the first A run (before autolog was ever "
            f"enabled) {a[0].median_step:.1f} ms, of the later A runs {med(later):.1f} ms "
            f"({med(later) / a[0].median_step:.2f}x; one run before, so noisy)\n"
        )
    expected = 2 * s.epochs
    checks = [
        (
            f"sanity: every B run created {expected} READY LoggedModels (2 per epoch): "
            f"{[r.ready_models for r in b]} READY of {[r.logged_models for r in b]}",
            all(r.ready_models == r.logged_models == expected for r in b),
        ),
        (
            f"sanity: the EMA was updated at every step of every B run: {[r.ema_steps for r in b]}",
            all(r.ema_steps == len(r.all_steps) for r in b),
        ),
        (
            f"sanity: A runs created no LoggedModel: {[r.logged_models for r in a]}",
            all(r.logged_models == 0 for r in a),
        ),
        (
            f"total wall time B/A - 1 <= {TOTAL_TARGET:.0%} (median over {len(ratios)} pairs): "
            f"{overhead:+.1%}",
            overhead <= TOTAL_TARGET,
        ),
        (
            f"checkpoint step <= {SPIKE_TARGET:g}x median step (B, median over "
            f"{len(ckpt_b)} checkpoints): {spike:.2f}x",
            spike <= SPIKE_TARGET,
        ),
    ]
    threads_before, threads_after = threads
    if threads_before is not None and threads_after is not None:
        checks.insert(
            3,
            (
                "sanity: autolog(disable=True) left no native thread behind (such as the OpenMP "
                "workers of a torch op run on the uploader thread, which slow every later step): "
                f"{threads_before} before the first run, {threads_after} after the last",
                threads_after <= threads_before,
            ),
        )
    return checks


# -- main -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="pairs of A and B runs (default 3)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run (default 5)")
    parser.add_argument("--steps", type=int, default=64, help="steps per epoch (default 64)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument(
        "--quick", action="store_true", help="1 pair of 2 x 16-step epochs: a smoke run, not a measurement"
    )
    args = parser.parse_args()
    pairs, epochs, steps = (1, 2, 16) if args.quick else (args.pairs, args.epochs, args.steps)
    if steps <= AFTER:
        parser.error(f"--steps must be more than {AFTER}")
    s = Setup(batch_size=args.batch_size, steps_per_epoch=steps, epochs=epochs)

    model = build_model(s)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"mlflow {mlflow.__version__}; MLP {s.in_features}-{s.hidden}x{s.depth}-{s.classes}: "
        f"{sum(p.numel() for p in model.parameters()):,} parameters in {len(list(model.parameters()))} "
        f"tensors; batch {s.batch_size}; {pairs} pairs of runs of {s.epochs} epochs x "
        f"{s.steps_per_epoch} steps; {load_average()}"
    )
    del model

    dataset = build_data(s)
    home = Path.cwd()
    runs: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="mlflow-ema-bench-") as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        try:
            mlflow.set_experiment("training_overhead")  # creates the store: not timed
            warm_up(s, dataset, steps=2 * steps)
            threads_before = native_threads()
            for pair in range(pairs):
                order = (BASELINE, AUTOLOG) if pair % 2 == 0 else (AUTOLOG, BASELINE)
                for variant in order:
                    r = run_variant(s, dataset, variant)
                    runs.append(r)
                    print(
                        f"  {r.variant}: {r.total_s:.2f} s, median step {r.median_step:.2f} ms, "
                        f"{r.logged_models} LoggedModels",
                        flush=True,
                    )
        finally:
            os.chdir(home)

    threads_after = native_threads()
    print(f"\n{load_average()} at the end")
    results = report(s, runs, (threads_before, threads_after))
    return print_verdicts(results, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
