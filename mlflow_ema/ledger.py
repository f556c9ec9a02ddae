"""What each run checkpointed and measured: which metrics belong to which checkpoint,
and which checkpoints ``keep_top_k`` supersedes. Pure bookkeeping, no I/O.

Linking rule. A checkpoint is linked to the metrics the run logs

- at the checkpoint's ``step`` (MLflow's convention, as ``log_model(step=...)`` does), or
- with no optimizer step between the checkpoint and the metric: the metric was computed
  on the checkpoint's weights, whatever ``step`` the loop logs it with (an evaluation
  right before or after a checkpoint, Lightning's validation, ``log_checkpoint(metrics=)``).

Metrics named ``ema/...`` go to the EMA checkpoint, all others to the raw one.
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
    seq: int  # identifies it


@dataclasses.dataclass
class CheckpointRecord:
    run_id: str
    kind: str
    step: int
    epoch: int | None
    name: str
    train_step: int  # optimizer steps the process had taken when it was snapshotted
    model_id: str | None = None
    status: str = "pending"  # pending -> ready | failed; ready -> deleted
    linked: set[tuple[str, int]] = dataclasses.field(default_factory=set)  # (key, seq)


@dataclasses.dataclass
class _Run:
    metrics: list[MetricRecord] = dataclasses.field(default_factory=list)
    checkpoints: list[CheckpointRecord] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)


class Ledger:
    """Thread-safe: the training thread records, the upload thread reads and marks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._seq = 0

    def _run(self, run_id: str) -> _Run:
        return self._runs.setdefault(run_id, _Run())

    def observe_metric(
        self, run_id: str, key: str, value: float, step: int, timestamp: int, train_step: int
    ) -> None:
        with self._lock:
            self._seq += 1
            metric = MetricRecord(key, float(value), int(step), int(timestamp), train_step, self._seq)
            self._run(run_id).metrics.append(metric)

    def add_checkpoint(
        self, run_id: str, kind: str, step: int, epoch: int | None, name: str, train_step: int
    ) -> CheckpointRecord:
        with self._lock:
            record = CheckpointRecord(run_id, kind, step, epoch, name, train_step)
            self._run(run_id).checkpoints.append(record)
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

    def record_failure(self, run_id: str, message: str) -> None:
        with self._lock:
            self._run(run_id).failures.append(message)

    def failures(self, run_id: str) -> list[str]:
        with self._lock:
            run = self._runs.get(run_id)
            return list(run.failures) if run else []

    def run_ids(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    def forget(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    # -- the linking rule -------------------------------------------------------------

    def unlinked_metrics(self, record: CheckpointRecord) -> list[MetricRecord]:
        """Metrics that belong to ``record`` (see the module docstring) and are not linked yet."""
        with self._lock:
            run = self._runs.get(record.run_id)
            metrics = list(run.metrics) if run else []
        return [
            m
            for m in metrics
            if m.key.startswith(EMA_PREFIX) == (record.kind == "ema")
            and (m.step == record.step or m.train_step == record.train_step)
            and (m.key, m.seq) not in record.linked
        ]

    def linked_value(self, record: CheckpointRecord, key: str) -> float | None:
        """The value of ``key`` linked to ``record`` (the one at its step first)."""
        with self._lock:
            run = self._runs[record.run_id]
            values = {m.seq: m for m in run.metrics if m.key == key}
        linked = [values[seq] for k, seq in record.linked if k == key and seq in values]
        linked.sort(key=lambda m: (m.step != record.step, m.seq))
        return linked[0].value if linked else None

    # -- keep_top_k ---------------------------------------------------------------------

    def superseded(
        self, run_id: str, *, keep_top_k: int, monitor: str, mode: str, final: bool
    ) -> list[CheckpointRecord]:
        """Ready checkpoints outside the ``keep_top_k`` best by ``monitor``, never the last
        one. While the run goes on, a checkpoint whose value is not known yet is kept;
        at the end (``final``) it ranks last."""
        records = [c for c in self.checkpoints(run_id) if c.status in ("pending", "ready")]
        taken = sorted({c.train_step for c in records})  # raw and EMA of one moment share it
        if not taken:
            return []
        scores: dict[int, float | None] = {}
        for moment in taken:
            known = [self.linked_value(c, monitor) for c in records if c.train_step == moment]
            known = [v for v in known if v is not None and not math.isnan(v)]
            scores[moment] = known[0] if known else None
        candidates = [s for s in taken[:-1] if final or scores[s] is not None]
        sign = -1.0 if mode == "max" else 1.0
        ranked = sorted(candidates, key=lambda s: (scores[s] is None, sign * (scores[s] or 0.0), -s))
        dropped = set(ranked[keep_top_k:])
        return [c for c in records if c.train_step in dropped and c.status == "ready"]
