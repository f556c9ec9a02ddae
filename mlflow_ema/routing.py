"""Metric routing: which metrics logged to MLflow are measured on the EMA weights.

Metrics logged while the EMA weights are in (``mlflow_ema.swap()``, Lightning's EMA
validation) get the ``ema/`` prefix (``val_acc`` -> ``ema/val_acc``); so do the names
Lightning's validation produced when ``mlflow.pytorch.autolog()`` logs them later. Every
metric logged to a run then tells the ledger which checkpoint it describes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

from mlflow_ema.ledger import EMA_PREFIX

_COUNTERS = {"epoch", "step", "global_step"}  # bookkeeping Lightning logs: no ema/ prefix


class MetricRouter:
    """The ``ema/`` prefix: per thread inside :meth:`ema_weights_in`, and for remembered names."""

    def __init__(self) -> None:
        self._prefix_threads: set[int] = set()  # threads logging metrics of the EMA weights now
        self.ema_keys: set[str] = set()  # names only ever measured on EMA weights (Lightning validation)

    @contextlib.contextmanager
    def ema_weights_in(self) -> Iterator[None]:
        """Metrics logged to MLflow from this thread get the ``ema/`` prefix meanwhile."""
        ident = threading.get_ident()
        self._prefix_threads.add(ident)
        try:
            yield
        finally:
            self._prefix_threads.discard(ident)

    @property
    def prefixing(self) -> bool:
        """Does any thread log metrics of the EMA weights now?"""
        return bool(self._prefix_threads)

    def remember_ema_keys(self, names: Iterable[str]) -> None:
        self.ema_keys.update(names)

    def forget_ema_keys(self) -> None:
        self.ema_keys.clear()

    def prefixed(self, key: str) -> str:
        """The name ``key`` is logged under."""
        if key.startswith(EMA_PREFIX) or key in _COUNTERS:
            return key
        if key in self.ema_keys or threading.get_ident() in self._prefix_threads:
            return EMA_PREFIX + key
        return key
