"""A worker thread that runs jobs in order, for the sha256 computed beside a read or a write.

Plain threads, not ``concurrent.futures``: an executor refuses new work once the
interpreter has begun to exit, which is when the upload thread writes a run's last
checkpoints (``tracking``'s exit hook). Where no thread can be started, jobs run inline.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class Job:
    """One call, run by a :class:`Worker`; :meth:`result` waits for it and raises its error."""

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self._fn, self._args = fn, args
        self._done = threading.Event()
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fn(*self._args)
        except BaseException as e:  # handed to whoever waits for the job
            self._error = e
        finally:
            self._done.set()

    def result(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error


class Worker:
    """One thread running the jobs submitted to it, in order, until :meth:`close`."""

    def __init__(self, name: str = "mlflow-ema-sha256") -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = threading.Thread(target=self._loop, name=name, daemon=True)
        try:
            self._thread.start()
        except RuntimeError:  # no new threads now (the interpreter is shutting down): run inline
            self._thread = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job:
        job = Job(fn, args)
        if self._thread is None:
            job.run()
        else:
            self._jobs.put(job)
        return job

    def close(self) -> None:
        """Finish the jobs submitted, then stop the thread."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.run()
