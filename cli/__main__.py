"""``python -m mlflow_ema.cli``: the same as the ``mlflow-ema`` command."""

from mlflow_ema.cli.main import main

main(prog_name="mlflow-ema")
