"""Writes checkpoints and uploads them to MLflow as LoggedModels, on a background thread.

The training loop hands over CPU snapshots (:mod:`mlflow_ema.snapshot`) and goes
on; it waits only when ``max_queue`` checkpoints are already waiting (back-pressure
instead of unbounded memory). For each checkpoint the thread

1. writes the checkpoint folder (safetensors + manifest) to a temporary folder;
2. creates a PENDING LoggedModel (``source_run_id``, tags ``mlflow_ema.kind``,
   ``mlflow_ema.step``, ...), records it as an output of the run at its step,
   uploads the folder and links the run's metrics to it (:mod:`mlflow_ema.ledger`);
3. finalizes it READY only once every file is uploaded. A crash mid-upload leaves a
   PENDING (or FAILED) model, which averaging never uses.

Every request is retried with backoff. A checkpoint that still cannot be uploaded
is kept on disk under ``mlflow-ema-unsent/<run_id>/`` and reported (a warning and
the run tag ``mlflow_ema.upload_failures``), never dropped silently.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow_ema.checkpoint import DEFAULT_MAX_SHARD_SIZE, TRAINING_STATE_FILE, save_checkpoint, weights_digest
from mlflow_ema.errors import CheckpointError
from mlflow_ema.ledger import CheckpointRecord, Ledger
from mlflow_ema.snapshot import Snapshot
from mlflow_ema.tags import (  # noqa: F401  # RUN_TAG_UPLOAD_FAILURES, TAG_MODEL: still imported from here
    RUN_TAG_UPLOAD_FAILURES,
    TAG_ALL_FINITE,
    TAG_EPOCH,
    TAG_FORMAT_VERSION,
    TAG_INIT_FINGERPRINT,
    TAG_KIND,
    TAG_MODEL,
    TAG_SHA256,
    TAG_STEP,
    TAG_TRAINING_STATE,
)

_logger = logging.getLogger("mlflow_ema")
SLOW_WAIT = 5.0  # seconds the training may wait for an upload slot before it is told why


@dataclasses.dataclass
class CheckpointPart:
    """One LoggedModel to create: the raw or the EMA weights of one moment."""

    record: CheckpointRecord
    state: Snapshot  # of the state dict
    training_state: Snapshot | None = None
    ema_decay: float | None = None
    ema_updates: int | None = None
    init_fingerprint: str | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class UploadJob:
    run_id: str
    tracking_uri: str
    parts: list[CheckpointPart]
    run_tags: dict[str, str] = dataclasses.field(default_factory=dict)  # set once per run
    architecture: tuple[str, Path] | None = None  # (artifact path, local folder): uploaded once per run
    keep_top_k: int | None = None
    monitor: str | None = None
    mode: str = "max"


class RunRecords:
    """What the upload thread records once per run beside checkpoints: the run tags of each
    model, and its architecture folder (:mod:`mlflow_ema.programs`)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._tagged: set[tuple[str, str, str]] = set()  # (run_id, key, value) set already
        self._architectures: set[tuple[str, str]] = set()  # (run_id, artifact path) uploaded

    def tag(self, client: Any, job: UploadJob, retry: RetryPolicy) -> None:
        """The run tags of the job's model not set yet (several models share a run)."""
        new = {k: v for k, v in job.run_tags.items() if (job.run_id, k, v) not in self._tagged}
        try:
            if new:
                retry.call("set_tags", lambda: [client.set_tag(job.run_id, k, v) for k, v in new.items()])
                self._tagged |= {(job.run_id, k, v) for k, v in new.items()}
        except Exception as e:
            _logger.warning("mlflow-ema: could not tag run %s: %s", job.run_id, e)

    def upload_architecture(self, client: Any, job: UploadJob, retry: RetryPolicy) -> None:
        """The model's architecture folder, once per run."""
        if job.architecture is None or (job.run_id, job.architecture[0]) in self._architectures:
            return
        path, folder = job.architecture
        try:
            retry.call("log_artifacts", lambda: client.log_artifacts(job.run_id, str(folder), path))
            self._architectures.add((job.run_id, path))
        except Exception as e:
            self.ledger.record_failure(job.run_id, f"{path}: {type(e).__name__}: {e}")
            _logger.warning("mlflow-ema: could not upload the model's architecture to %s: %s", path, e)


@dataclasses.dataclass
class RetryPolicy:
    attempts: int = 3
    backoff: float = 1.0  # seconds before the second attempt; doubles after each

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:
                if attempt == self.attempts:
                    raise
                _logger.debug("mlflow-ema: %s failed (%s), retrying", what, e)
                time.sleep(self.backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable")


class Uploader:
    """The background thread and its queue; one per process."""

    def __init__(self, ledger: Ledger, *, max_queue: int = 2, retry: RetryPolicy | None = None) -> None:
        self.ledger = ledger
        self.retry = retry or RetryPolicy()
        self.max_queue = max_queue
        self.max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE
        self.unsent_dir: Path | None = None  # default: ./mlflow-ema-unsent when a failure happens
        self._jobs: collections.deque[UploadJob] = collections.deque()
        self._to_sync: dict[str, UploadJob] = {}  # run_id -> policy, for links and pruning
        self._working: set[str] = set()  # runs the thread is uploading or syncing now
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._clients: dict[str, Any] = {}
        self._experiments: dict[str, str] = {}
        self._runs = RunRecords(ledger)
        self._warned_waits: set[str] = set()  # runs whose training was told it waits for uploads

    # -- called from the training side ------------------------------------------------

    def submit(self, job: UploadJob) -> None:
        """Queue a checkpoint; blocks only while ``max_queue`` are already waiting, and says
        so once per run when that lasts more than :data:`SLOW_WAIT` seconds."""
        with self._cond:
            started = time.monotonic()
            while len(self._jobs) >= self.max_queue:  # back-pressure
                waited = time.monotonic() - started
                if waited >= SLOW_WAIT and job.run_id not in self._warned_waits:
                    self._warned_waits.add(job.run_id)
                    warnings.warn(_wait_message(job, waited, len(self._jobs), self.max_queue), stacklevel=4)
                self._cond.wait(
                    timeout=None if job.run_id in self._warned_waits else SLOW_WAIT - waited + 0.01
                )
            self._jobs.append(job)
            self._wake()

    def request_sync(self, job: UploadJob) -> None:
        """Link newly logged metrics and prune for this run, soon, off the training thread."""
        with self._cond:
            self._to_sync[job.run_id] = job
            self._wake()

    def flush(self, run_id: str | None = None, timeout: float | None = None) -> bool:
        """Wait until the run's (or every) checkpoint is uploaded or given up on."""

        def busy() -> bool:
            runs = {j.run_id for j in self._jobs} | set(self._to_sync) | self._working
            return bool(runs) if run_id is None else run_id in runs

        with self._cond:
            return self._cond.wait_for(lambda: not busy(), timeout=timeout)

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _wake(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="mlflow-ema-uploader", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    # -- the background thread -----------------------------------------------------------

    def _work(self) -> None:
        _background_priority()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._to_sync or self._closed)
                if self._closed and not self._jobs and not self._to_sync:
                    return
                job = self._jobs.popleft() if self._jobs else None
                syncs = [] if job else list(self._to_sync.values())
                if not job:
                    self._to_sync = {}
                self._working = {j.run_id for j in ([job] if job else syncs)}
                self._cond.notify_all()  # a queue slot is free
            if job is not None:
                try:
                    self._upload(job)
                except Exception as e:  # a bug, not a network fault: report, keep the thread alive
                    _logger.exception("mlflow-ema: checkpoint upload crashed")
                    self.ledger.record_failure(job.run_id, f"upload crashed: {e}")
                syncs = [job]
            for sync_job in syncs:
                try:
                    self._sync(sync_job)
                except Exception as e:
                    _logger.warning("mlflow-ema: linking metrics for run %s failed: %s", sync_job.run_id, e)
            with self._cond:
                self._working = set()
                self._cond.notify_all()

    def _client(self, tracking_uri: str):
        if tracking_uri not in self._clients:
            from mlflow import MlflowClient

            self._clients[tracking_uri] = MlflowClient(tracking_uri)
        return self._clients[tracking_uri]

    def _experiment_id(self, client, run_id: str) -> str:
        if run_id not in self._experiments:
            run = self.retry.call("get_run", lambda: client.get_run(run_id))
            self._experiments[run_id] = run.info.experiment_id
        return self._experiments[run_id]

    def _upload(self, job: UploadJob) -> None:
        client = self._client(job.tracking_uri)
        self._runs.tag(client, job, self.retry)
        self._runs.upload_architecture(client, job, self.retry)
        with tempfile.TemporaryDirectory(prefix="mlflow-ema-") as tmp:
            for part in job.parts:
                folder = Path(tmp) / part.record.name
                try:
                    state = part.state.wait()
                except CheckpointError as e:  # rank parts that cannot be merged: nothing to keep
                    part.record.status = "failed"
                    self.ledger.record_failure(job.run_id, f"{part.record.name}: {e}")
                    _logger.warning("mlflow-ema: could not assemble checkpoint %s: %s", part.record.name, e)
                    continue
                manifest = save_checkpoint(
                    folder,
                    state,
                    kind=part.record.kind,
                    step=part.record.step,
                    epoch=part.record.epoch,
                    ema_decay=part.ema_decay,
                    ema_updates=part.ema_updates,
                    init_fingerprint=part.init_fingerprint,
                    training_state=part.training_state.wait() if part.training_state else None,
                    max_shard_size=self.max_shard_size,
                )
                part.state = part.training_state = None  # free the snapshot's memory early
                try:
                    self._log_model(client, job, part.record, folder, manifest, part.tags)
                except Exception as e:
                    self._keep_unsent(job, part.record, folder, e)

    def _log_model(
        self, client, job: UploadJob, record: CheckpointRecord, folder: Path, manifest, tags
    ) -> None:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        tags = checkpoint_tags(record, manifest, tags)
        experiment_id = self._experiment_id(client, job.run_id)
        if record.model_id is None:
            model = self.retry.call(
                "create_logged_model",
                lambda: client.create_logged_model(
                    experiment_id, name=record.name, source_run_id=job.run_id, tags=tags
                ),
            )
            record.model_id = model.model_id
        output = LoggedModelOutput(record.model_id, step=record.step)
        self.retry.call("log_outputs", lambda: client.log_outputs(job.run_id, [output]))
        self.retry.call(
            "log_model_artifacts", lambda: client.log_model_artifacts(record.model_id, str(folder))
        )
        self._link(client, record)
        self.retry.call(
            "finalize_logged_model",
            lambda: client.finalize_logged_model(record.model_id, LoggedModelStatus.READY),
        )
        record.status = "ready"

    def _link(self, client, record: CheckpointRecord) -> None:
        from mlflow.entities import Metric

        metrics = self.ledger.unlinked_metrics(record)
        if not metrics or record.model_id is None:
            return
        batch = [
            Metric(m.key, m.value, m.timestamp, m.step, model_id=record.model_id, run_id=record.run_id)
            for m in metrics
        ]
        self.retry.call("link metrics", lambda: client.log_batch(record.run_id, metrics=batch))
        self.ledger.mark_linked(record, metrics)

    def _sync(self, job: UploadJob) -> None:
        client = self._client(job.tracking_uri)
        for record in self.ledger.checkpoints(job.run_id):
            if record.status == "ready":
                self._link(client, record)
        if job.keep_top_k is not None and job.monitor:
            self.prune(job, final=False)

    def prune(self, job: UploadJob, *, final: bool) -> None:
        """Delete the checkpoints that ``keep_top_k`` supersedes (MLflow's soft delete;
        ``mlflow gc`` reclaims their artifacts)."""
        client = self._client(job.tracking_uri)
        for record in self.ledger.superseded(
            job.run_id, keep_top_k=job.keep_top_k, monitor=job.monitor, mode=job.mode, final=final
        ):
            self.retry.call("delete_logged_model", lambda r=record: client.delete_logged_model(r.model_id))
            record.status = "deleted"

    def _keep_unsent(self, job: UploadJob, record: CheckpointRecord, folder: Path, error: Exception) -> None:
        from mlflow.entities import LoggedModelStatus

        record.status = "failed"
        if record.model_id is not None:
            # So the UI shows it failed rather than pending forever; best effort.
            with contextlib.suppress(Exception):
                self._client(job.tracking_uri).finalize_logged_model(
                    record.model_id, LoggedModelStatus.FAILED
                )
        destination = _keep_on_disk(
            folder, (self.unsent_dir or Path.cwd() / "mlflow-ema-unsent") / job.run_id
        )
        message = f"{record.name}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} (kept at {destination})"
        self.ledger.record_failure(job.run_id, message)
        _logger.warning("mlflow-ema: could not upload checkpoint %s", message)


def _background_priority() -> None:
    """Linux: this thread (and the helpers it starts, which inherit it) at nice 19, so the
    training's threads keep the cores: a core taken from torch's OpenMP team stalls the whole
    step while its other workers spin. Not SCHED_IDLE: training waits for this thread at
    ``max_queue`` and at the run's end, and on a loaded machine an idle-class thread would
    hardly run. Per thread on Linux only (elsewhere it would renice the process); a refusal
    is not an error."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _wait_message(job: UploadJob, waited: float, queued: int, max_queue: int) -> str:
    return (
        f"mlflow-ema: training has waited {waited:.0f} s for an upload slot: {queued} checkpoint(s) are queued "
        f"(max_queue={max_queue}) and the upload in progress is slow, so the tracking server ({job.tracking_uri}) "
        "is slow or unreachable. Training goes on as uploads finish; a larger max_queue waits less (more memory)"
    )


def checkpoint_tags(record: CheckpointRecord, manifest: Any, extra: dict[str, str]) -> dict[str, str]:
    """The tags of a checkpoint's LoggedModel (see :mod:`mlflow_ema.tags`)."""
    tags = {
        **extra,
        TAG_KIND: record.kind,
        TAG_STEP: str(record.step),
        TAG_ALL_FINITE: str(manifest.all_finite).lower(),
        TAG_SHA256: weights_digest(manifest),
        TAG_FORMAT_VERSION: str(manifest.format_version),
        TAG_TRAINING_STATE: str(TRAINING_STATE_FILE in manifest.files).lower(),
    }
    if record.epoch is not None:
        tags[TAG_EPOCH] = str(record.epoch)
    if manifest.init_fingerprint:
        tags[TAG_INIT_FINGERPRINT] = manifest.init_fingerprint
    return tags


def _keep_on_disk(folder: Path, unsent: Path) -> Path:
    """Move a checkpoint that could not be uploaded to ``unsent/<its name>``; returns where."""
    destination = unsent / folder.name
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        shutil.rmtree(destination)
    shutil.move(str(folder), destination)
    return destination
