"""What each run checkpointed and measured: which metrics belong to which checkpoint,
and which checkpoints ``keep_top_k`` supersedes. Pure bookkeeping, no I/O.

Linking rule. A checkpoint is linked to the metrics the run logs

- at the checkpoint's ``step`` (MLflow's convention, as ``log_model(step=...)`` does), or
- with no optimizer step between the checkpoint and the metric: the metric was computed
  on the checkpoint's weights, whatever ``step`` the loop logs it with (an evaluation
  right before or after a checkpoint, Lightning's validation, ``log_checkpoint(metrics=)``).

Metrics named ``ema/...`` go to the EMA checkpoint, all others to the raw one.

Memory stays bounded: a metric is kept only while a checkpoint could still claim it
(until two more optimizer steps have passed), and handed to the checkpoints that do.
"""

from __future__ import annotations

import dataclasses
import math
import threading

EMA_PREFIX = "ema/"


@dataclasses.dataclass(frozen=True)
class MetricRecord:
    key: str
    value: float
    step: int
    timestamp: int
    train_step: int  # optimizer steps the process had taken when it was logged


@dataclasses.dataclass(eq=False)
class CheckpointRecord:
    run_id: str
    kind: str
    step: int
    epoch: int | None
    name: str
    train_step: int  # optimizer steps the process had taken when it was snapshotted
    model_id: str | None = None
    status: str = "pending"  # pending -> ready | failed; ready -> deleted
    to_link: list[MetricRecord] = dataclasses.field(default_factory=list)
    values: dict[str, float] = dataclasses.field(default_factory=dict)  # linked: key -> value

    def claims(self, metric: MetricRecord) -> bool:
        if self.kind not in ("raw", "ema"):  # post-hoc snapshots: no metric describes them
            return False
        return metric.key.startswith(EMA_PREFIX) == (self.kind == "ema") and (
            metric.step == self.step or metric.train_step == self.train_step
        )


@dataclasses.dataclass
class _Run:
    recent: list[MetricRecord] = dataclasses.field(default_factory=list)
    checkpoints: list[CheckpointRecord] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)


class Ledger:
    """Thread-safe: the training thread records, the upload thread reads and marks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}

    def _run(self, run_id: str) -> _Run:
        return self._runs.setdefault(run_id, _Run())

    def observe_metric(
        self, run_id: str, key: str, value: float, step: int, timestamp: int, train_step: int
    ) -> bool:
        """Record a logged metric; True if a checkpoint already claims it."""
        metric = MetricRecord(key, float(value), int(step), int(timestamp), train_step)
        with self._lock:
            run = self._run(run_id)
            run.recent = [m for m in run.recent if m.train_step >= train_step - 1]
            run.recent.append(metric)
            claimed = False
            for record in run.checkpoints:
                if record.status in ("pending", "ready") and record.claims(metric):
                    record.to_link.append(metric)
                    claimed = True
            return claimed

    def add_checkpoint(
        self, run_id: str, kind: str, step: int, epoch: int | None, name: str, train_step: int
    ) -> CheckpointRecord:
        with self._lock:
            run = self._run(run_id)
            record = CheckpointRecord(run_id, kind, step, epoch, name, train_step)
            record.to_link = [m for m in run.recent if record.claims(m)]
            run.checkpoints.append(record)
            return record

    def has_checkpoint(self, run_id: str, step: int, name_prefix: str = "") -> bool:
        with self._lock:
            run = self._runs.get(run_id)
            return bool(run) and any(
                c.step == step and c.name.startswith(name_prefix) for c in run.checkpoints
            )

    def checkpoints(self, run_id: str) -> list[CheckpointRecord]:
        with self._lock:
            run = self._runs.get(run_id)
            return list(run.checkpoints) if run else []

    def unlinked_metrics(self, record: CheckpointRecord) -> list[MetricRecord]:
        """The metrics ``record`` claims and has not linked yet; they count as linked
        once :meth:`mark_linked` is called, and are handed out again otherwise."""
        with self._lock:
            return list(record.to_link)

    def mark_linked(self, record: CheckpointRecord, metrics: list[MetricRecord]) -> None:
        with self._lock:
            for metric in metrics:
                record.to_link.remove(metric)
                # a value at the checkpoint's own step wins over one matched by weights
                if metric.key not in record.values or metric.step == record.step:
                    record.values[metric.key] = metric.value

    def record_failure(self, run_id: str, message: str) -> None:
        with self._lock:
            self._run(run_id).failures.append(message)

    def failures(self, run_id: str) -> list[str]:
        with self._lock:
            run = self._runs.get(run_id)
            return list(run.failures) if run else []

    def forget(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    # -- keep_top_k ---------------------------------------------------------------------

    def superseded(
        self, run_id: str, *, keep_top_k: int, monitor: str, mode: str, final: bool
    ) -> list[CheckpointRecord]:
        """Ready checkpoints outside the ``keep_top_k`` best by ``monitor``, never the last
        one. While the run goes on, a checkpoint whose value is not known yet is kept;
        at the end (``final``) it ranks last."""
        records = [
            c for c in self.checkpoints(run_id) if c.status in ("pending", "ready") and c.kind != "posthoc"
        ]
        taken = sorted({c.train_step for c in records})  # raw and EMA of one moment share it
        if not taken:
            return []
        scores: dict[int, float | None] = {}
        for moment in taken:
            known = [c.values.get(monitor) for c in records if c.train_step == moment]
            known = [v for v in known if v is not None and not math.isnan(v)]
            scores[moment] = known[0] if known else None
        candidates = [s for s in taken[:-1] if final or scores[s] is not None]
        sign = -1.0 if mode == "max" else 1.0
        ranked = sorted(candidates, key=lambda s: (scores[s] is None, sign * (scores[s] or 0.0), -s))
        dropped = set(ranked[keep_top_k:])
        return [c for c in records if c.train_step in dropped and c.status == "ready"]
