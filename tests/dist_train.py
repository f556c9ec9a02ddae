"""Training under ``torchrun`` for tests/test_distributed.py (gloo on the CPU, 2 ranks).

    torchrun --nproc_per_node 2 tests/dist_train.py --mode ddp|fsdp --out DIR [--ema-ranks all|zero]

Every rank trains on its half of the same global batches of scikit-learn's digits (so
the result equals one process training on the whole batches), under
``mlflow_ema.autolog``. Rank 0 alone opens the MLflow run (the tracking URI comes from
the environment); every rank calls ``mlflow_ema.log_checkpoint()`` at the end. Each rank
writes ``DIR/rank<r>.json``: what it saw.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import digits_batches, make_mlp

import mlflow_ema
from mlflow_ema.checkpoint import init_fingerprint

STEPS, CHECKPOINT_EVERY, DECAY, LR = 12, 5, 0.8, 0.1
POSTHOC_EVERY = 4  # FSDP2: post-hoc EMA snapshots (sigma_rel 0.05 and 0.10) at steps 4, 8, 12


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ema-ranks", default="all")
    parser.add_argument(
        "--parts-dir", help="sharded models: autolog(sharded_save_dir=...) instead of a gather"
    )
    parser.add_argument(
        "--end", choices=["log_checkpoint", "run_end"], default="log_checkpoint",
        help="log_checkpoint() on every rank at the end, or rely on checkpoint_at_end",
    )  # fmt: skip
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    args.out.mkdir(parents=True, exist_ok=True)

    model = make_mlp(seed=0)  # the same initial weights on every rank
    if args.mode == "ddp":
        trained = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        trained = fully_shard(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=LR, momentum=0.9)
    mlflow_ema.autolog(
        decay=DECAY,
        checkpoint_every_n_steps=CHECKPOINT_EVERY,
        checkpoint_at_end=args.end == "run_end",
        ema_ranks=args.ema_ranks,
        sharded_save_dir=args.parts_dir,
        posthoc_every_n_steps=POSTHOC_EVERY if args.mode == "fsdp" else None,
    )

    import mlflow

    run = (
        mlflow.start_run(run_name=f"{args.mode}-{args.ema_ranks}") if rank == 0 else contextlib.nullcontext()
    )
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught, run:
        warnings.simplefilter("always")
        for x, y in digits_batches(STEPS):
            xs, ys = x[rank::world], y[rank::world]  # this rank's half of the global batch
            loss = nn.functional.cross_entropy(trained(xs), ys)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if args.end == "log_checkpoint":
            mlflow_ema.log_checkpoint()  # on every rank, as documented
        eval_loss = None
        if args.ema_ranks == "all":  # evaluate with the EMA weights swapped in, on every rank's half
            x, y = next(digits_batches(1, seed=7))
            with torch.no_grad(), mlflow_ema.swap():
                loss = nn.functional.cross_entropy(trained(x[rank::world]), y[rank::world])
            dist.all_reduce(loss)
            eval_loss = loss.item() / world
        try:
            ema = mlflow_ema.get_ema()
            state = {
                k: v.full_tensor() if hasattr(v, "full_tensor") else v
                for k, v in ema.model_state_dict().items()
            }
            result = {
                "ema_steps": ema.step,
                "ema_fingerprint": init_fingerprint(state),
                "init": ema.init_fingerprint,
                "shadow_shapes": {n: list(t.shape) for n, t in ema.state_dict()["shadow"].items()},
            }
        except mlflow_ema.MlflowEmaError as e:
            result = {"no_ema": str(e)}
        result["run_id"] = run.info.run_id if rank == 0 else None
        result["ema_eval_loss"] = eval_loss
    result["warnings"] = [
        str(w.message) for w in caught if "mlflow-ema" in str(w.message) or "sharded" in str(w.message)
    ]
    # rank 0 has flushed its uploads when the run closed; the others got here long before
    dist.barrier()
    result["seconds"] = time.monotonic() - started
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
