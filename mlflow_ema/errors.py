"""Exceptions raised by mlflow-ema.

Every error a user can cause derives from :class:`MlflowEmaError`, so a caller
(the CLI among them) can report it as one line and let genuine bugs surface as
tracebacks.
"""

from __future__ import annotations


class MlflowEmaError(Exception):
    """Base class of the errors mlflow-ema raises for bad input."""


class IncompatibleModelError(MlflowEmaError, ValueError):
    """A model, or saved EMA state, does not match the structure the EMA was built for."""


class CheckpointError(MlflowEmaError):
    """A checkpoint is missing, corrupt, truncated or of an unknown format."""


class ChecksumMismatchError(CheckpointError):
    """A checkpoint file's sha256 differs from the one its manifest records."""


class SelectionError(MlflowEmaError):
    """No (or not enough) checkpoints match the selection."""


class AveragingError(MlflowEmaError):
    """The members cannot be averaged: mismatched tensors, other initialization, NaN/inf..."""


class RegistryError(MlflowEmaError):
    """A registered model, version or alias is missing or invalid."""


class StoreError(MlflowEmaError):
    """The tracking store cannot be reached, or does not exist."""


class UntrustedCodeError(MlflowEmaError):
    """Code named by a tracking server (a run's tag) that the user has not trusted: it is
    never imported (see ``--trust-module``)."""


class PosthocError(MlflowEmaError, ValueError):
    """Post-hoc EMA cannot reconstruct what was asked: no or too few snapshots, a step
    beyond the last one, a singular system, a ``sigma_rel`` out of range."""
