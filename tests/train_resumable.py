"""A training script for the resume test: ``full``, ``killed`` or ``resume``.

``killed`` trains with checkpoints every 10 steps and is SIGKILLed at step 25, after
the step-20 checkpoint is uploaded; ``resume`` continues that run to step 30. The
scheduler, stepped after every optimizer step, is ``$RESUME_SCHEDULER``: ``step7``
(StepLR, step_size 7: the default), ``step10`` (StepLR, step_size 10: the lr changes on
the steps that checkpoint) or ``cosine`` (CosineAnnealingLR over the 30 steps).
"""

from __future__ import annotations

import os
import signal
import sys

import mlflow
import torch
from helpers import make_net, train_steps
from sklearn.datasets import load_digits

import mlflow_ema

TOTAL, KILL_AT = 30, 25
SCHEDULERS = {
    "step7": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5),
    "step10": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL),
}


def main(mode: str, run_id: str | None = None) -> None:
    x, y = load_digits(return_X_y=True)
    digits = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    mlflow_ema.autolog(checkpoint_every_n_steps=10, log_training_state=True, decay=0.9)
    model = make_net()
    model[2] = torch.nn.Dropout(0.2)  # consumes RNG: the resumed run must restore it
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = SCHEDULERS[os.environ.get("RESUME_SCHEDULER", "step7")](opt)

    def after_step():
        sched.step()
        if mode == "killed" and mlflow_ema.get_ema().step == KILL_AT:
            mlflow_ema.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    with mlflow.start_run(run_id=run_id) as run:
        print(run.info.run_id, flush=True)
        start = 0
        if mode == "resume":
            start = mlflow_ema.resume(model, opt, sched).step
        train_steps(model, opt, digits, TOTAL - start, start=start, after_step=after_step)


if __name__ == "__main__":
    main(*sys.argv[1:])
