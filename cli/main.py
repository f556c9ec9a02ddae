"""The click group behind ``mlflow-ema``."""

from __future__ import annotations

import click

from mlflow_ema._version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlflow-ema")
def main() -> None:
    """Weight averaging for MLflow-tracked PyTorch training.

    Keep an EMA of the weights during training (``mlflow_ema.EMA`` in Python),
    then average the best runs' checkpoints and register the result.
    """


if __name__ == "__main__":
    main()
