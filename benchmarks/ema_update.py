"""Benchmark: milliseconds per EMA update, mlflow_ema.EMA against floors and common alternatives.

Compared on the same model, in the same process:

- ``this EMA``: ``mlflow_ema.EMA(model, decay=0.999).update()``;
- ``foreach_lerp floor``: one ``torch._foreach_lerp_`` over prebuilt lists of the same
  float tensors the EMA averages (parameters and float buffers; ``num_batches_tracked``
  is not averaged by the EMA, so not here either). The least work an EMA update can do;
- ``foreach_copy floor``: one ``torch._foreach_copy_`` over the same lists (a pure copy);
- ``seed state_dict loop``: the per-tensor loop found in many repositories,
  ``v.mul_(d).add_(msd[k], alpha=1 - d)`` over ``model.state_dict()`` each update;
- ``AveragedModel``: ``torch.optim.swa_utils.AveragedModel`` with
  ``multi_avg_fn=get_ema_multi_avg_fn(0.999)`` and ``use_buffers=True``.

Two models built from ``torch.nn`` only: (a) ~24M parameters in ~300 tensors (Linear and
LayerNorm), where an update is memory-bound; (b) ~2M parameters in ~3000 tensors (Conv2d and
BatchNorm), where per-tensor overhead dominates.

Before timing, each averaging method takes a few updates toward perturbed weights and its
result is checked against the lerp floor, so the timings compare the same work. Timing runs
under ``torch.no_grad()`` with the default thread count: every method is warmed up, then the
methods run interleaved in rounds (the order rotating every round) of enough updates to take
about 100 ms each; the median ms/update over the rounds is reported, since the machine may
be shared and noisy.

Run from the repository root (about 1-2 minutes; ``--quick`` for a short smoke run)::

    .venv/bin/python benchmarks/ema_update.py [--rounds 20] [--quick] [--device cuda]

Exits with status 1 if a sanity check or a target fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import mlflow_ema

DECAY = 0.999
WEIGHT = 1.0 - DECAY  # the lerp weight EMA.update() uses for this decay
LERP_FLOOR = "foreach_lerp floor"
THIS_EMA = "this EMA"
SEED_LOOP = "seed state_dict loop"
AVERAGED_MODEL = "AveragedModel"


# -- models -------------------------------------------------------------------------


def wide_model(width: int = 564, depth: int = 75) -> nn.Module:
    """~24M parameters in ~300 tensors: Linear + LayerNorm blocks."""
    return nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(depth)))


def many_tensor_model(channels: int = 21, depth: int = 500) -> nn.Module:
    """~2M parameters in ~3000 tensors: Conv2d + BatchNorm2d blocks."""
    return nn.Sequential(
        *(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
            for _ in range(depth)
        )
    )


def describe(model: nn.Module) -> str:
    params = list(model.parameters())
    buffers = dict(model.named_buffers())
    n_tracked = sum(name.endswith("num_batches_tracked") for name in buffers)
    n_float = sum(b.is_floating_point() for b in buffers.values())
    return (
        f"{sum(p.numel() for p in params):,} parameters in {len(params)} tensors; "
        f"{len(buffers)} buffers ({n_float} float, {n_tracked} num_batches_tracked); "
        f"{len(params) + len(buffers)} tensors in all, {len(params) + n_float} averaged"
    )


def float_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's float parameters and buffers by state_dict key (what EMA averages)."""
    return {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}


# -- the methods --------------------------------------------------------------------


@dataclasses.dataclass
class Method:
    name: str
    step: Callable[[], object]  # one EMA update
    result: Callable[[], dict[str, torch.Tensor]] | None  # averaged float tensors by key


def this_ema(model: nn.Module) -> Method:
    ema = mlflow_ema.EMA(model, decay=DECAY)
    return Method(THIS_EMA, ema.update, lambda: _floats(ema.model_state_dict()))


def _prebuilt_lists(model: nn.Module) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """Keys, shadow copies and live model tensors of what EMA averages, built once."""
    live = float_tensors(model)
    return list(live), [t.clone() for t in live.values()], list(live.values())


def lerp_floor(model: nn.Module) -> Method:
    names, shadow, weights = _prebuilt_lists(model)
    return Method(
        LERP_FLOOR,
        lambda: torch._foreach_lerp_(shadow, weights, WEIGHT),
        lambda: dict(zip(names, shadow, strict=True)),
    )


def copy_floor(model: nn.Module) -> Method:
    _, shadow, weights = _prebuilt_lists(model)
    return Method("foreach_copy floor", lambda: torch._foreach_copy_(shadow, weights), None)


def seed_loop(model: nn.Module) -> Method:
    ema_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def step() -> None:
        msd = model.state_dict()
        for k, v in ema_sd.items():
            if v.dtype.is_floating_point:
                v.mul_(DECAY).add_(msd[k].detach(), alpha=1 - DECAY)

    return Method(SEED_LOOP, step, lambda: _floats(ema_sd))


def averaged_model(model: nn.Module) -> Method:
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
    averaged.update_parameters(model)  # the first call only copies the weights
    return Method(
        AVERAGED_MODEL,
        lambda: averaged.update_parameters(model),
        lambda: _floats(averaged.module.state_dict()),
    )


def _floats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if v.is_floating_point()}


def build_methods(model: nn.Module) -> list[Method]:
    return [
        this_ema(model),
        lerp_floor(model),
        copy_floor(model),
        seed_loop(model),
        averaged_model(model),
    ]


# -- sanity check and timing --------------------------------------------------------


def check_same_work(model: nn.Module, methods: list[Method], updates: int = 3) -> None:
    """Each averaging method, fed the same perturbed weights, lands where the lerp floor does."""
    live = list(float_tensors(model).values())
    for _ in range(updates):
        for t in live:
            t.add_(torch.randn_like(t), alpha=0.1)
        for method in methods:
            method.step()
    expected = next(m for m in methods if m.name == LERP_FLOOR).result()
    for method in methods:
        if method.result is None or method.name == LERP_FLOOR:
            continue
        got = method.result()
        if got.keys() != expected.keys():
            raise SystemExit(f"sanity check FAILED: {method.name} averages other tensors than the floor")
        worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
        if not all(torch.allclose(got[k], expected[k], rtol=1e-5, atol=1e-6) for k in expected):
            raise SystemExit(f"sanity check FAILED: {method.name} differs from the floor by {worst:.3g}")
        print(
            f"  sanity: {method.name:<20} matches the lerp floor on {len(got)} tensors (max |diff| {worst:.1e})"
        )


def _synchronize() -> None:
    """Wait for queued CUDA kernels (a no-op on CPU): a GPU update is timed when it is done."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds_per_call(step: Callable[[], object], calls: int) -> float:
    _synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    _synchronize()
    return (time.perf_counter() - start) / calls


def calls_per_round(step: Callable[[], object], round_ms: float) -> int:
    """Warm up ``step`` for ~0.2 s and return how many calls take ``round_ms``."""
    per_call = seconds_per_call(step, 2)
    warmup_calls = max(2, int(0.2 / per_call))
    per_call = seconds_per_call(step, warmup_calls)
    return max(1, round(round_ms / 1e3 / per_call))


def time_methods(methods: list[Method], rounds: int, round_ms: float) -> dict[str, float]:
    """Median ms/update per method over ``rounds`` interleaved rounds."""
    calls = {m.name: calls_per_round(m.step, round_ms) for m in methods}
    samples: dict[str, list[float]] = {m.name: [] for m in methods}
    for r in range(rounds):
        for method in methods[r % len(methods) :] + methods[: r % len(methods)]:
            samples[method.name].append(1e3 * seconds_per_call(method.step, calls[method.name]))
    return {name: statistics.median(ms) for name, ms in samples.items()}


def print_table(title: str, ms: dict[str, float]) -> None:
    floor = ms[LERP_FLOOR]
    print(f"\n### {title}\n")
    print("| method | ms/update | x lerp floor |")
    print("|---|---:|---:|")
    for name, value in ms.items():
        print(f"| {name} | {value:.3f} | {value / floor:.2f}x |")
    print(
        f"\nthis EMA is {ms[AVERAGED_MODEL] / ms[THIS_EMA]:.1f}x faster than AveragedModel "
        f"and {ms[SEED_LOOP] / ms[THIS_EMA]:.1f}x faster than the seed loop\n"
    )


def bench(title: str, model: nn.Module, rounds: int, round_ms: float) -> dict[str, float]:
    print(f"\n## {title}: {describe(model)}")
    methods = build_methods(model)
    check_same_work(model, methods)
    ms = time_methods(methods, rounds, round_ms)
    print_table(title, ms)
    return ms


# -- main ---------------------------------------------------------------------------


def targets(wide: dict[str, float], many: dict[str, float]) -> list[tuple[str, bool]]:
    return [
        (
            f"(a) this EMA <= 1.15x lerp floor: {wide[THIS_EMA] / wide[LERP_FLOOR]:.2f}x",
            wide[THIS_EMA] <= 1.15 * wide[LERP_FLOOR],
        ),
        (
            f"(b) this EMA <= 1.15x lerp floor: {many[THIS_EMA] / many[LERP_FLOOR]:.2f}x",
            many[THIS_EMA] <= 1.15 * many[LERP_FLOOR],
        ),
        (
            f"(b) this EMA >= 5x faster than AveragedModel: {many[AVERAGED_MODEL] / many[THIS_EMA]:.1f}x",
            many[AVERAGED_MODEL] >= 5 * many[THIS_EMA],
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (default 20)")
    parser.add_argument("--quick", action="store_true", help="5 short rounds: a smoke run, not a measurement")
    parser.add_argument(
        "--device", default="cpu", help="where the models and EMAs live, e.g. cuda (default cpu)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    rounds, round_ms = (5, 30.0) if args.quick else (args.rounds, 100.0)

    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
        f"{rounds} rounds of ~{round_ms:.0f} ms"
    )
    with torch.no_grad():
        wide = bench("(a) wide: Linear + LayerNorm", wide_model().to(device), rounds, round_ms)
        many = bench(
            "(b) many tensors: Conv2d + BatchNorm2d", many_tensor_model().to(device), rounds, round_ms
        )

    results = targets(wide, many)
    for line, ok in results:
        print(f"{'PASS' if ok else 'FAIL'}: {line}")
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
