"""Train a LightningModule on scikit-learn's bundled digits with an EMA of its weights
(``mlflow_ema.lightning.EMACallback``), tracked in MLflow through Lightning's MLFlowLogger.

Real data, no download. Validation runs twice per epoch: with the raw weights (MLflow
records ``val_acc``), then with the EMA weights (``ema/val_acc``); Lightning's
``callback_metrics`` hold both. After every epoch the raw and EMA checkpoints become
LoggedModels of the run, ``val_acc`` linked to the raw ones and ``ema/val_acc`` to the EMA
ones. Prints the raw and EMA validation accuracy per epoch (``lag``: raw minus EMA, how far
the average trails the weights) and, at the end, the run's LoggedModels.

    python examples/lightning_digits.py --epochs 10 --lr 0.05 --seed 0

With nothing configured, MLflow records into ``./mlflow.db``; see the result with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from examples.train_digits import build_model, load_digits_split


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--decay", type=float, default=0.99, help="EMA decay (warmed up from 0)")
    parser.add_argument("--experiment", default="lightning-digits")
    args = parser.parse_args(argv)

    # imported here so --help answers at once
    import lightning.pytorch as pl
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset

    from mlflow_ema import WarmupDecay
    from mlflow_ema.lightning import EMACallback

    class DigitsClassifier(pl.LightningModule):
        def __init__(self, hidden: int = 128, lr: float = 0.05):
            super().__init__()
            self.save_hyperparameters()  # recorded on the run: the model can be rebuilt from them
            self.model = build_model(hidden)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch  # the raw weights in the first pass, the EMA ones in the second
            self.log("val_acc", (self(x).argmax(dim=1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    class PrintAccuracy(pl.Callback):
        """After each epoch: the validation accuracy of the raw and of the EMA weights."""

        def on_train_epoch_end(self, trainer, pl_module):
            raw_acc = trainer.callback_metrics["val_acc"].item()
            ema_acc = trainer.callback_metrics["ema/val_acc"].item()
            epoch = trainer.current_epoch + 1
            print(f"{epoch:>5}  {raw_acc:>7.4f}  {ema_acc:>7.4f}  {raw_acc - ema_acc:>+7.4f}")

    pl.seed_everything(args.seed, verbose=False)
    x_train, y_train, x_val, y_val = load_digits_split()
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=len(x_val))

    tracking_uri = mlflow.get_tracking_uri()  # ./mlflow.db unless configured otherwise
    logger = MLFlowLogger(experiment_name=args.experiment, tracking_uri=tracking_uri)
    logger.log_hyperparams({"seed": args.seed, "batch_size": args.batch_size, "ema_decay": args.decay})
    ema = EMACallback(decay=WarmupDecay(decay=args.decay, power=3 / 4), checkpoint_every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[ema, PrintAccuracy()],
        logger=logger,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        enable_checkpointing=False,  # the checkpoints are the run's LoggedModels
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    print(f"run {logger.run_id} in experiment {args.experiment!r} at {tracking_uri}")
    print(f"{'epoch':>5}  {'raw acc':>7}  {'EMA acc':>7}  {'lag':>7}")
    trainer.fit(DigitsClassifier(lr=args.lr), train, val)

    # fit returns once every checkpoint is uploaded
    models = mlflow.search_logged_models(
        experiment_ids=[logger.experiment_id],
        filter_string=f"source_run_id = '{logger.run_id}'",
        output_format="list",
    )
    print(f"\ncheckpoints of run {logger.run_id} (LoggedModels):")
    for model in sorted(models, key=lambda m: (int(m.tags["mlflow_ema.step"]), m.tags["mlflow_ema.kind"])):
        linked = ", ".join(f"{m.key}={m.value:.4f}" for m in model.metrics or [] if "val_acc" in m.key)
        print(
            f"  {model.name:<13} {model.model_id}  epoch {model.tags.get('mlflow_ema.epoch')}  {linked}".rstrip()
        )
    print(
        "load one with mlflow_ema.load_checkpoint("
        "mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location))"
    )


if __name__ == "__main__":
    main()
