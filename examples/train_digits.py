"""Train a small network on scikit-learn's bundled digits with an EMA of its weights,
tracked in MLflow.

Real data, no download. Prints raw and EMA validation accuracy per epoch, logs both
as MLflow metrics (``val_acc`` and ``ema/val_acc``) and, at the end, writes the raw
and EMA checkpoints (safetensors + manifest) as artifacts of the run under
``checkpoints/raw`` and ``checkpoints/ema``.

    python examples/train_digits.py --epochs 15 --lr 0.05 --seed 0

With nothing configured, MLflow records into ``./mlflow.db``; see the result with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import mlflow_ema


def load_digits_split(seed: int = 0):
    """Digits as (x_train, y_train, x_val, y_val) tensors: a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def build_model(hidden: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return correct


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--decay", type=float, default=0.99, help="EMA decay (warmed up from 0)")
    parser.add_argument("--experiment", default="digits")
    args = parser.parse_args(argv)

    import mlflow  # imported here so --help answers at once

    torch.manual_seed(args.seed)
    x_train, y_train, x_val, y_val = load_digits_split()
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    ema = mlflow_ema.EMA(model, decay=mlflow_ema.WarmupDecay(decay=args.decay, power=3 / 4))

    mlflow.set_experiment(args.experiment)
    with mlflow.start_run() as run:
        mlflow.log_params(vars(args))
        print(f"run {run.info.run_id} in experiment {args.experiment!r}")
        print(f"{'epoch':>5}  {'raw acc':>8}  {'EMA acc':>8}  {'EMA - raw':>9}")
        step = 0
        for epoch in range(1, args.epochs + 1):
            for batch in torch.randperm(len(x_train)).split(args.batch_size):
                loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                ema.update()
                step += 1
            raw_acc = accuracy(model, x_val, y_val)
            with ema.swap():
                ema_acc = accuracy(model, x_val, y_val)
            mlflow.log_metrics({"val_acc": raw_acc, "ema/val_acc": ema_acc, "loss": loss.item()}, step=step)
            print(f"{epoch:>5}  {raw_acc:>8.4f}  {ema_acc:>8.4f}  {ema_acc - raw_acc:>+9.4f}")

        with tempfile.TemporaryDirectory() as tmp:
            for kind, state in (("raw", model.state_dict()), ("ema", ema.model_state_dict())):
                mlflow_ema.save_checkpoint(
                    Path(tmp) / kind,
                    state,
                    kind=kind,
                    step=step,
                    epoch=args.epochs,
                    ema_decay=ema.last_decay if kind == "ema" else None,
                    ema_updates=ema.num_updates if kind == "ema" else None,
                    init_fingerprint=ema.init_fingerprint,
                )
            mlflow.log_artifacts(tmp, artifact_path="checkpoints")
        print(f"checkpoints logged to {run.info.artifact_uri}/checkpoints")


if __name__ == "__main__":
    main()
