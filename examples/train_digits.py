"""Train a small network on scikit-learn's bundled digits with ``mlflow_ema.autolog()``.

Real data, no download. One line, ``mlflow_ema.autolog(...)``, keeps an EMA of the
weights and logs raw and EMA checkpoints of every epoch as MLflow LoggedModels
(``keep_top_k`` keeps the best three by ``ema/val_acc``, plus the last). Each epoch
the script evaluates the raw weights (``val_acc``) and, inside ``mlflow_ema.swap()``,
the EMA weights (logged as ``ema/val_acc``), and prints both:

    epoch  raw acc  EMA acc     lag
        1   0.9472   0.9694  -0.0222

``lag`` is raw minus EMA accuracy: how far the average trails the weights (negative
when it is ahead). ``--init-from`` starts from a checkpoint: a local checkpoint
folder or an MLflow LoggedModel URI (``models:/<model_id>``).

    python examples/train_digits.py --epochs 15 --lr 0.05 --seed 0

With nothing configured, MLflow records into ``./mlflow.db``; look at it with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import mlflow_ema


def digits_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits as ``{"train", "val", "test"}`` -> (x, y) tensors: a fixed 60/20/20 split.

    ``val`` ranks checkpoints and scores soups; ``test`` is held out from both, so the main
    job's final table (``examples/digits_soup.py``) is not biased by the selection."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    parts = {"train": order[:a], "val": order[a:b], "test": order[b:]}
    return {name: (x[idx], y[idx]) for name, idx in parts.items()}


def load_digits_split(seed: int = 0):
    """(x_train, y_train, x_val, y_val) of :func:`digits_splits`; the test part stays unseen."""
    splits = digits_splits(seed)
    return (*splits["train"], *splits["val"])


def augment(x: torch.Tensor, how: str, generator: torch.Generator) -> torch.Tensor:
    """``shift``: move each 8x8 image by up to one pixel; ``noise``: add Gaussian noise
    (sigma 0.1); ``none``: leave it."""
    if how == "noise":
        return x + 0.1 * torch.randn(x.shape, generator=generator)
    if how == "shift":
        n = len(x)
        padded = nn.functional.pad(x.view(n, 8, 8), (1, 1, 1, 1))
        dy, dx = torch.randint(0, 3, (2, n), generator=generator)
        rows = (dy[:, None] + torch.arange(8))[:, :, None]
        cols = (dx[:, None] + torch.arange(8))[:, None, :]
        return padded[torch.arange(n)[:, None, None], rows, cols].reshape(n, 64)
    return x


def build_model(hidden: int = 128) -> nn.Module:
    """The network; recorded on the run as the model factory, so it can be rebuilt."""
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
    was_training = model.training
    model.eval()
    correct = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train(was_training)
    return correct


def val_accuracy(model: nn.Module) -> float:
    """Accuracy on the validation split: ``mlflow-ema average --eval examples.train_digits:val_accuracy``."""
    return accuracy(model, *digits_splits()["val"])


def test_accuracy(model: nn.Module) -> float:
    """Accuracy on the held-out test split, for the main job's final comparison only."""
    return accuracy(model, *digits_splits()["test"])


def load_initial_weights(model: nn.Module, source: str) -> None:
    """``source``: a checkpoint folder, or ``models:/<model_id>`` of a logged checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        if source.startswith("models:/"):
            import mlflow

            source = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp)
        state_dict, _ = mlflow_ema.load_checkpoint(Path(source))
    model.load_state_dict(state_dict)


def main(argv: list[str] | None = None) -> str:
    """Train one run; returns its MLflow run id."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--decay", type=float, default=0.99, help="EMA decay, warmed up from 0")
    parser.add_argument("--augment", choices=["none", "shift", "noise"], default="none",
                        help="training-time augmentation: shift by up to a pixel, or Gaussian noise")  # fmt: skip
    parser.add_argument("--init-from", help="checkpoint folder or models:/<model_id> to start from")
    parser.add_argument("--keep-top-k", type=int, default=3, help="checkpoints kept per run (plus the last)")
    parser.add_argument("--posthoc-every-n-steps", type=int,
                        help="snapshot power-function EMAs every N steps, to choose the EMA length after training "
                        "(mlflow-ema posthoc)")  # fmt: skip
    parser.add_argument("--experiment", default="digits")
    parser.add_argument("--run-name", help="MLflow run name (default: MLflow picks one)")
    parser.add_argument("--quiet", action="store_true", help="print nothing per epoch")
    args = parser.parse_args(argv)
    say = (lambda *a, **k: None) if args.quiet else print

    import mlflow  # imported here so --help answers at once

    mlflow_ema.autolog(
        decay=mlflow_ema.WarmupDecay(decay=args.decay, power=3 / 4),
        checkpoint_every_n_epochs=1,
        keep_top_k=args.keep_top_k,
        monitor="ema/val_acc",
        posthoc_every_n_steps=args.posthoc_every_n_steps,  # None: off
    )
    torch.manual_seed(args.seed)
    noise = torch.Generator().manual_seed(args.seed)
    x_train, y_train, x_val, y_val = load_digits_split()
    model = build_model(args.hidden)
    if args.init_from:
        load_initial_weights(model, args.init_from)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True
    )

    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name=args.run_name) as run:
        mlflow.log_params(vars(args))
        say(f"run {run.info.run_id} in experiment {args.experiment!r}")
        say(f"{'epoch':>5}  {'raw acc':>7}  {'EMA acc':>7}  {'lag':>7}")
        for epoch in range(1, args.epochs + 1):
            for xb, yb in loader:  # the end of this loop is an epoch end for autolog
                loss = nn.functional.cross_entropy(model(augment(xb, args.augment, noise)), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            raw_acc = accuracy(model, x_val, y_val)
            mlflow.log_metrics({"val_acc": raw_acc, "loss": loss.item()}, step=epoch)
            with mlflow_ema.swap():  # EMA weights in; val_acc is logged as ema/val_acc
                ema_acc = accuracy(model, x_val, y_val)
                mlflow.log_metric("val_acc", ema_acc, step=epoch)
            say(f"{epoch:>5}  {raw_acc:>7.4f}  {ema_acc:>7.4f}  {raw_acc - ema_acc:>+7.4f}")
    say("checkpoints (raw and EMA LoggedModels) are in the run; see them in the MLflow UI's Models tab")
    return run.info.run_id


if __name__ == "__main__":
    main()
