"""Benchmark: finding an optimizer's model in a process holding millions of Python objects.

autolog finds the model at an optimizer's first ``step()``. It used to scan the heap
(``gc.get_objects()``, then ``isinstance`` on each); it now looks at what the frames on the
call stack hold (``mlflow_ema.discovery.held_objects``). This script fills the heap with
``--objects`` small objects (default 5 million, as a process with a big dataset in Python
lists would have), then times, interleaved over ``--repeats`` rounds, from inside a real
``optimizer.step()`` call of a training loop:

- **now**: ``held_objects()`` + ``find_model`` + ``find_schedulers`` (what autolog runs);
- **heap scan**: the old way, ``gc.get_objects()`` filtered for modules and schedulers.

Target (issue 13): at most 50 ms in such a process.

    .venv/bin/python benchmarks/discovery.py [--objects 5000000] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_verdicts

from mlflow_ema.discovery import SCHEDULER_TYPES, find_model, find_schedulers, held_objects


def heap_scan(optimizer) -> nn.Module | None:
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        live = [o for o in gc.get_objects() if isinstance(o, (nn.Module, *SCHEDULER_TYPES))]
    return find_model(optimizer, live)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=5_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100k objects, 2 repeats: checks that it runs")
    args = parser.parse_args()
    if args.quick:
        args.objects, args.repeats = 100_000, 2
    ballast = [[i] for i in range(args.objects)]  # gc tracks each list (its small int is not tracked)
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}; gc tracks {len(gc.get_objects()):,} objects"
    )

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
    times: dict[str, list[float]] = {"now": [], "heap scan": []}
    found: dict[str, object] = {}

    def measure(opt, args_, kwargs_) -> None:  # runs inside optimizer.step(), as autolog's hook does
        start = time.perf_counter()
        held = held_objects()
        found["now"] = (find_model(opt, held), find_schedulers([opt], held))
        times["now"].append(time.perf_counter() - start)
        start = time.perf_counter()
        found["heap scan"] = heap_scan(opt)
        times["heap scan"].append(time.perf_counter() - start)

    handle = optimizer.register_step_pre_hook(measure)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    for _ in range(args.repeats):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    handle.remove()

    print(
        f"\n| way | median ms | min ms | max ms |  ({args.repeats} rounds, interleaved)\n|---|---:|---:|---:|"
    )
    for name, values in times.items():
        ms = [v * 1000 for v in values]
        print(f"| {name} | {statistics.median(ms):.2f} | {min(ms):.2f} | {max(ms):.2f} |")
    now, scan = statistics.median(times["now"]), statistics.median(times["heap scan"])
    print(f"\nheap scan / now: {scan / now:.0f}x")
    del ballast
    verdicts = [
        ("sanity: both ways find the model", found["now"][0] is model and found["heap scan"] is model),
        ("sanity: the scheduler is found", found["now"][1] == [scheduler]),
        (f"discovery at most 50 ms with {args.objects:,} objects: {now * 1000:.2f} ms", now <= 0.05),
    ]
    return print_verdicts(verdicts, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
