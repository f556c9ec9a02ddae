"""A user's training script for the scheduler resume matrix (tests/test_resume_matrix.py).

``train(case, mode)`` is what a user writes: a plain loop over epochs of steps with
``mlflow_ema.autolog(log_training_state=True, checkpoint_every_n_steps=...)``, a torch
scheduler stepped after every optimizer step or after every epoch (ReduceLROnPlateau: with
the epoch's validation loss), and ``mlflow_ema.resume(...)`` on restart. ``mode`` is
``full`` (uninterrupted), ``killed`` (flushes, then SIGKILLs itself after step
``case.kill``) or ``resume`` (continues the killed run). The data a step draws depends only
on the step, and dropout consumes the RNG, so a resumed run must restore it.

Run as ``python train_schedulers.py full|killed OUTDIR CASE ...``: the driver imports (and
warms up) once, then forks one fresh process per case and mode (``killed``: then one more,
``resume``, which continues the killed run), which writes
``OUTDIR/CASE-MODE.pt``: the run id, the step resumed from, the final raw and EMA weights
and the optimizer's final learning rates; a killed one prints its run id (``.log``) and
must die of SIGKILL (``.status``).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.optim import lr_scheduler as S

import mlflow_ema


@dataclasses.dataclass(frozen=True)
class Case:
    make: Callable[[Any, int], Any]  # (optimizer, number of scheduler steps) -> scheduler
    per: str  # "step" or "epoch"
    total: int = 40  # optimizer steps
    every: int = 20  # checkpoint_every_n_steps
    kill: int = 25  # the killed run dies after this step (after its scheduler stepped)
    steps_per_epoch: int = 10


def warmup_then_decay(step: int) -> float:
    """LambdaLR's lambda: user code, which the scheduler's state_dict does not hold."""
    return min(1.0, (step + 1) / 4) * 0.9**step


def warmup_cosine(opt: Any, n: int) -> Any:
    k = max(1, n // 4)
    warm = S.LinearLR(opt, start_factor=0.1, total_iters=k)
    return S.SequentialLR(opt, [warm, S.CosineAnnealingLR(opt, T_max=n - k)], milestones=[k])


SCHEDULERS: dict[str, Callable[[Any, int], Any]] = {
    "StepLR": lambda opt, n: S.StepLR(opt, step_size=max(1, n // 6), gamma=0.5),
    "MultiStepLR": lambda opt, n: S.MultiStepLR(opt, milestones=[n // 4, n // 2, 3 * n // 4], gamma=0.5),
    "CosineAnnealingLR": lambda opt, n: S.CosineAnnealingLR(opt, T_max=n),
    "CosineAnnealingWarmRestarts": lambda opt, n: S.CosineAnnealingWarmRestarts(
        opt, T_0=max(2, n // 6), T_mult=2
    ),
    "OneCycleLR": lambda opt, n: S.OneCycleLR(opt, max_lr=0.05, total_steps=n),
    "LambdaLR": lambda opt, n: S.LambdaLR(opt, warmup_then_decay),
    "LinearLR": lambda opt, n: S.LinearLR(opt, start_factor=0.1, total_iters=3 * n // 4),
    "SequentialLR": warmup_cosine,
    "ReduceLROnPlateau": lambda opt, n: S.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=0.5),
}
CASES: dict[str, Case] = {
    **{
        f"{name}-per-step": Case(make, "step")
        for name, make in SCHEDULERS.items()
        if name != "ReduceLROnPlateau"
    },
    # 6 epochs of 10 steps; killed at 35, resumed from the step-30 checkpoint: the end of
    # epoch 3, after which the loop stepped the scheduler
    **{
        f"{name}-per-epoch": Case(make, "epoch", total=60, every=30, kill=35)
        for name, make in SCHEDULERS.items()
        if name != "OneCycleLR"
    },
    # resumed from the step-45 checkpoint, in the middle of epoch 5
    "StepLR-per-epoch-mid-epoch": Case(SCHEDULERS["StepLR"], "epoch", total=60, every=15, kill=50),
    # the lr changes on the very steps that checkpoint: 0.01 -> 0.005 at 50 -> 0.0025 at 100
    "StepLR-50-checkpoint-every-50": Case(
        lambda opt, n: S.StepLR(opt, step_size=50, gamma=0.5), "step", total=150, every=50, kill=120
    ),
    "CosineAnnealingLR-killed-at-120-of-150": Case(
        SCHEDULERS["CosineAnnealingLR"], "step", total=150, every=30, kill=122
    ),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))


def train(name: str, mode: str, run_id: str | None = None) -> dict[str, Any]:
    case = CASES[name]
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    val_x, val_y = x[-300:], y[-300:]
    epochs = case.total // case.steps_per_epoch
    mlflow_ema.autolog(checkpoint_every_n_steps=case.every, log_training_state=True, decay=0.9)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = case.make(opt, case.total if case.per == "step" else epochs)

    with mlflow.start_run(run_id=run_id) as run:
        start = mlflow_ema.resume(model, opt, sched).step if mode == "resume" else 0
        lrs = {}  # the lr each step trains with
        if mode == "killed":
            print(run.info.run_id, flush=True)
        for epoch in range(start // case.steps_per_epoch, epochs):
            model.train()
            for step in range(max(start, epoch * case.steps_per_epoch), (epoch + 1) * case.steps_per_epoch):
                idx = torch.randint(0, len(x) - 300, (32,), generator=torch.Generator().manual_seed(step))
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                lrs[step] = opt.param_groups[0]["lr"]
                opt.zero_grad()
                loss.backward()
                opt.step()
                if case.per == "step":
                    sched.step()
                if mode == "killed" and step + 1 == case.kill:
                    mlflow_ema.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            if isinstance(sched, S.ReduceLROnPlateau):
                model.eval()
                with torch.no_grad():
                    sched.step(nn.functional.cross_entropy(model(val_x), val_y).item())
            elif case.per == "epoch":
                sched.step()
        ema = mlflow_ema.get_ema().model_state_dict()  # the watched model is let go when the run ends
    return {
        "run_id": run.info.run_id,
        "start": start,
        "raw": {k: v.clone() for k, v in model.state_dict().items()},
        "ema": {k: v.clone() for k, v in ema.items()},
        "lr": [group["lr"] for group in opt.param_groups],
        "lrs": lrs,
    }


def run_forked(mode: str, out: Path, name: str, run_id: str | None) -> None:
    """``train`` in a fresh child process, its output in ``OUTDIR/CASE-MODE.log``; how it
    ended (``exit 0``, or ``signal 9``: a killed one must die of SIGKILL) in ``.status``."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            log = os.open(out / f"{name}-{mode}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            torch.save(train(name, mode, run_id), out / f"{name}-{mode}.pt")
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    ended = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
    (out / f"{name}-{mode}.status").write_text(ended)


def warm_up() -> None:
    """What every child would do first (imports, a first step, torch.export), done once
    here: on one thread, so that no OpenMP pool exists when the children are forked."""
    torch.set_num_threads(1)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.zeros(2, 64)).sum().backward()
    opt.step()
    import importlib

    for module in (
        "mlflow.store.tracking.sqlalchemy_store",
        "mlflow.store.model_registry.sqlalchemy_store",
        "mlflow.store.db.utils",
        "alembic.command",
        "sqlalchemy.dialects.sqlite",
        "sympy.combinatorics",
        "mlflow_ema.tracking",
        "mlflow_ema.resuming",
        "mlflow_ema.checkpoint",
        "mlflow_ema.programs",
        "mlflow_ema.uploader",
        "git",
    ):
        importlib.import_module(module)

    torch.export.export(model.eval(), (torch.zeros(2, 64),))


def killed_run_id(out: Path, name: str) -> str | None:
    """The run id the killed script printed."""
    lines = (out / f"{name}-killed.log").read_text().splitlines()
    ids = [line for line in lines if len(line) == 32 and all(c in "0123456789abcdef" for c in line)]
    return ids[0] if ids else None


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])  # "full", or "killed" (then resumed)
    warm_up()
    for name in sys.argv[3:]:
        run_forked(mode, out, name, None)
        if mode == "killed" and (run_id := killed_run_id(out, name)):
            run_forked("resume", out, name, run_id)
