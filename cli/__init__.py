"""The ``mlflow-ema`` command: a thin click layer over the library.

Installed as ``mlflow_ema.cli``. Start-up imports neither torch nor mlflow, so
``mlflow-ema --help`` answers at once; each command imports what it needs.
"""

from mlflow_ema.cli.main import main

__all__ = ["main"]
