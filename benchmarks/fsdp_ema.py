"""Benchmark: the EMA of an FSDP2-sharded model, per shard against gather-then-average.

Two ranks (gloo on the CPU, or with ``--device cuda`` NCCL with one GPU a rank; started
with torchrun by this script) shard a ~24M-parameter
model of Linear + LayerNorm blocks with ``fully_shard``. Compared in the same processes,
interleaved in rounds (order rotating), median milliseconds per update on rank 0:

- ``this EMA``: ``mlflow_ema.EMA(model).update()``: each rank lerps its own shards;
- ``local lerp floor``: one ``torch._foreach_lerp_`` over prebuilt lists of the local shards;
- ``gather then average``: what an EMA unaware of sharding does (Composer gathers the full
  parameters on every update): ``full_tensor()`` of each parameter, then a lerp into a
  full-size shadow on every rank.

Also printed: the EMA memory per rank of both, and the time of one checkpoint gather
(``mlflow_ema.snapshot.gather_sharded``: raw and EMA full state dicts to rank 0's CPU).

Run from the repository root (about 1 minute)::

    .venv/bin/python benchmarks/fsdp_ema.py [--rounds 10] [--quick] [--device cuda]

With ``--device cuda`` every timing round ends with ``torch.cuda.synchronize()`` on each
rank, so it times the kernels and the all-gathers, not their launches.

Exits with status 1 if a sanity check or the target (this EMA at least 5x faster than
gather-then-average) fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow_ema
from benchmarks._common import print_verdicts
from mlflow_ema.snapshot import gather_sharded

DECAY = 0.999


def wide_model(width: int = 564, depth: int = 75) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(depth)))


def run(args: argparse.Namespace) -> int:
    from torch.distributed.fsdp import fully_shard

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = wide_model().to(device)
    for block in model:
        fully_shard(block)
    fully_shard(model)
    params = list(model.parameters())
    ema = mlflow_ema.EMA(model, decay=DECAY)
    local = [p.to_local() for p in params]
    floor_shadow = [t.detach().clone() for t in local]
    full_shadow = [p.full_tensor().clone() for p in params]

    def gather_then_average() -> None:
        for shadow, p in zip(full_shadow, params, strict=True):
            shadow.lerp_(p.full_tensor(), 1 - DECAY)

    methods = {
        "this EMA": ema.update,
        "local lerp floor": lambda: torch._foreach_lerp_(floor_shadow, local, 1 - DECAY),
        "gather then average": gather_then_average,
    }
    # sanity: the per-shard EMA is the full EMA's shard (one update toward perturbed weights)
    with torch.no_grad():
        for t in local:
            t.add_(0.01)
    ema.update()
    gather_then_average()
    sane = all(
        torch.allclose(ema.model_state_dict()[name].full_tensor(), full, atol=1e-6)
        for name, full in zip(dict(model.named_parameters()), full_shadow, strict=True)
    )
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    repeats = 2 if args.quick else 5
    with torch.no_grad():
        for name in names:  # warm-up
            methods[name]()
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                _sync(cuda)
                start = time.perf_counter()
                for _ in range(repeats):
                    methods[name]()
                _sync(cuda)
                times[name].append((time.perf_counter() - start) / repeats * 1000)
    dist.barrier()
    start = time.perf_counter()
    raw, averaged = gather_sharded(model, ema)
    gather_s = time.perf_counter() - start
    status = 0
    if rank == 0:
        n = sum(p.numel() for p in params)
        ours = sum(t.numel() * t.element_size() for t in ema.state_dict()["shadow"].values())
        theirs = sum(t.numel() * t.element_size() for t in full_shadow)
        backend = "NCCL, CUDA" if cuda else "gloo, CPU"
        print(f"{n:,} parameters in {len(params)} tensors, 2 ranks ({backend}), {args.rounds} rounds\n")
        print("| method | ms / update (median) | vs this EMA |")
        print("|---|---|---|")
        base = statistics.median(times["this EMA"])
        for name in names:
            median = statistics.median(times[name])
            print(f"| {name} | {median:.2f} | {median / base:.2f}x |")
        print(
            f"\nEMA memory per rank: this EMA {ours / 2**20:.1f} MiB, gather then average {theirs / 2**20:.1f} MiB"
        )
        print(
            f"one checkpoint gather (raw + EMA to rank 0's CPU): {gather_s:.2f} s, {len(raw)} + {len(averaged)} tensors\n"
        )
        ratio = statistics.median(times["gather then average"]) / base
        status = print_verdicts(
            [
                ("sanity: the per-shard EMA equals the full EMA after an update", sane),
                (f"this EMA at least 5x faster than gather then average ({ratio:.1f}x)", ratio >= 5),
            ],
            quick=args.quick,
        )
    dist.destroy_process_group()
    return status


def _sync(cuda: bool) -> None:
    """Every rank here, and (on GPUs) every kernel queued so far done."""
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    if cuda:
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: NCCL, one GPU a rank")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        parser.error(f"--device cuda needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    if "LOCAL_RANK" not in os.environ:  # not under torchrun yet: start the two ranks
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            __file__,
            *sys.argv[1:],
        ]
        return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if args.quick:
        args.rounds = 3
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
