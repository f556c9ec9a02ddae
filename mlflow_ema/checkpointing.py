"""Taking checkpoints during training: snapshot -> upload job.

A checkpoint of a watched model is two CPU snapshots, the raw and the EMA weights, taken
right after an optimizer step (copies go through pinned memory on CUDA) and handed to the
upload thread (:mod:`mlflow_ema.uploader`), which writes and uploads them as LoggedModels.

With ``log_training_state`` the raw checkpoint also carries what :func:`mlflow_ema.resume`
needs, taken at one consistent moment for each part of it:

- the EMA and the RNG states when the checkpoint is taken (right after the step: the next
  forward pass would consume the RNG);
- every optimizer's and scheduler's state together when the model's next step begins (or
  its run ends, or :func:`mlflow_ema.flush` is called). A loop steps its schedulers after
  ``optimizer.step()``; taken then, the optimizers' learning rates and the schedulers'
  counters agree, and the optimizers' moments have not changed since the checkpoint.

Such a checkpoint waits on the training side (:attr:`Checkpoints.pending`), not on the
upload thread, so no upload ever waits for a step of some model.

A sharded (FSDP2) model's checkpoint is a collective: every rank gathers (or writes its
part) at once, agreeing first behind the safety boundary (:mod:`mlflow_ema.safety`), so a
failure on one rank switches it off on all. Only rank 0 writes to MLflow.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mlflow_ema.capture import architecture_folder
from mlflow_ema.posthoc_emas import sigma_rel_label
from mlflow_ema.programs import architecture_path
from mlflow_ema.safety import BOUNDARY, SHARDED
from mlflow_ema.snapshot import (
    MergedParts,
    MergedSnapshots,
    Snapshot,
    gather_posthoc,
    gather_sharded,
    save_part,
    take_snapshot,
)
from mlflow_ema.tags import RUN_TAG_ARCHITECTURE_ERROR, TAG_MODEL, TAG_MODEL_NAME, TAG_SIGMA_REL
from mlflow_ema.uploader import CheckpointPart, UploadJob
from mlflow_ema.watched import Watched

if TYPE_CHECKING:
    from mlflow_ema.session import Session

NO_RUN_MESSAGE = (
    "no active MLflow run: the EMA is kept but no checkpoint is logged "
    "(train inside `with mlflow.start_run():`)"
)
Run = tuple[str, str]  # (run_id, tracking_uri)


def rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# MLflow's ActiveRun object of the run last resolved, and that run. Holding the object keeps
# its identity unique: while the same object is the active run, it is the same run.
_resolved: tuple[Any, Run] | None = None


def active_run() -> Run | None:
    """This thread's active MLflow run and the tracking URI, resolved once per run: called
    at every optimizer step, it costs one thread-local lookup (``mlflow.active_run()``, the
    ActiveRun object ``start_run`` pushed) and an identity check. A run started or ended
    between two steps, nested or in another thread, is another object, resolved anew."""
    global _resolved
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return None
    resolved = _resolved
    if resolved is not None and resolved[0] is run:
        return resolved[1]
    found = (run.info.run_id, mlflow.get_tracking_uri())
    _resolved = (run, found)
    return found


def forget_run(run_id: str) -> None:
    """The run ``run_id`` ends: let go of its ActiveRun object."""
    global _resolved
    resolved = _resolved
    if resolved is not None and resolved[1][0] == run_id:
        _resolved = None


class Checkpoints:
    """The checkpoints a session takes, and those still waiting for their training state."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.pending: list[tuple[Watched, UploadJob, Snapshot]] = []  # (model, job, its state at the step)

    def take(
        self, w: Watched, *, step: int | None = None, epoch: int | None = None, run: Run | None = None
    ) -> bool:
        """Snapshot the raw and EMA weights of ``w`` and queue them for upload; False if
        skipped. ``run`` is given when the run is ending (on rank 0 alone)."""
        step = w.ema.step if step is None else int(step)
        if not w.sharded:
            return self._queue(w, step, epoch, run, None)
        if run is not None:  # a run ending on rank 0 alone: the other ranks cannot join a gather
            self._warn_sharded_end(w)
            return False
        gathered = _sharded_states(w, step, self.session.config.sharded_save_dir)
        if gathered is None or not rank_zero():
            return False
        queued = BOUNDARY.call(SHARDED, self._queue, w, step, epoch, None, gathered)
        if queued is None:  # failed here: rank 0 says so at the next agreement
            _discard(gathered)
        return bool(queued)

    def take_posthoc(self, w: Watched, *, run: Run | None = None) -> bool:
        """Snapshot ``w``'s post-hoc EMAs at their step and queue them for upload, one
        LoggedModel per ``sigma_rel``; False if skipped (taken at this step already, or no
        run). A sharded model's are gathered by every rank at once, like its checkpoints."""
        posthoc = w.posthoc
        if posthoc is None or posthoc.step == 0 or posthoc.last_snapshot_step == posthoc.step:
            return False
        states = None
        if w.sharded and run is not None:  # a run ending on rank 0 alone: the others cannot join a gather
            self._warn_sharded_end(w)
            return False
        posthoc.last_snapshot_step = posthoc.step  # alike on every rank
        if w.sharded:
            go, _ = BOUNDARY.prepare(SHARDED, lambda: None)
            states = (
                BOUNDARY.call(SHARDED, gather_posthoc, w.model, [ema for _, ema in posthoc]) if go else None
            )
            if states is None:
                return False
        run = (run or active_run()) if rank_zero() else None
        if run is None:
            if rank_zero():
                self.session.warn_once("no-run", NO_RUN_MESSAGE)
            return False
        self.session.name_models(run[0])
        parts = [self._posthoc_part(w, run[0], sigma_rel, ema, states[i] if states else None)
                 for i, (sigma_rel, ema) in enumerate(posthoc)]  # fmt: skip
        self.session.uploader.submit(self.session.upload_job(run[0], run[1], parts))
        return True

    def _posthoc_part(
        self, w: Watched, run_id: str, sigma_rel: float, ema: Any, gathered: Any
    ) -> CheckpointPart:
        name = f"{w.prefix}posthoc{sigma_rel_label(sigma_rel)}-step{ema.step}"
        record = self.session.ledger.add_checkpoint(
            run_id, "posthoc", ema.step, w.epochs or None, name, self.session.optimizer_steps
        )
        tags = {
            TAG_MODEL_NAME: w.label,
            TAG_SIGMA_REL: str(sigma_rel),
            **({TAG_MODEL: w.name} if w.name else {}),
        }
        snapshot = Snapshot(gathered) if gathered is not None else take_snapshot(ema.model_state_dict())
        return CheckpointPart(record, snapshot, ema_decay=ema.last_decay, ema_updates=ema.num_updates,
                              init_fingerprint=w.ema.init_fingerprint, tags=tags)  # fmt: skip

    def _warn_sharded_end(self, w: Watched) -> None:
        if w.last_sharded_step != w.ema.step:
            self.session.warn_once(
                f"sharded-end-{id(w)}",
                "the model is sharded, so its checkpoints are gathered by every rank at once and "
                "cannot be taken when the run ends on rank 0: the last "
                f"{w.ema.step - (w.last_sharded_step or 0)} steps have no checkpoint (call "
                "mlflow_ema.log_checkpoint() on every rank before the run ends, or use "
                "checkpoint_every_n_epochs / checkpoint_every_n_steps)",
            )

    def _queue(self, w: Watched, step: int, epoch: int | None, run: Run | None, gathered: Any) -> bool:
        """Rank 0: the upload job of ``step`` (``gathered``: a sharded model's full states)."""
        session = self.session
        if not rank_zero():
            return False
        at_end = run is not None
        run = run or active_run()
        if run is not None:
            session.name_models(run[0])
        if run is None or session.ledger.has_checkpoint(run[0], step, w.prefix + "raw-"):
            if run is None:
                session.warn_once("no-run", NO_RUN_MESSAGE)
            elif at_end:  # no checkpoint to add, but the run learns about its architecture
                session.uploader.submit(self._with_architecture(w, session.upload_job(*run), at_end=True))
            _discard(gathered)
            return False
        epoch = (w.epochs or None) if epoch is None else int(epoch)
        at_step = self._training_state_at_step(w, step, epoch)
        job = session.upload_job(run[0], run[1], self._parts(w, run[0], step, epoch, gathered))
        self._with_architecture(w, job, at_end=at_end)
        if at_step is None:
            session.uploader.submit(job)
        else:  # the optimizers' and schedulers' state comes when the next step begins
            self.pending.append((w, job, at_step))
        return True

    def _with_architecture(self, w: Watched, job: UploadJob, *, at_end: bool) -> UploadJob:
        """The job also uploads ``w``'s architecture folder (exported now, the first time) and
        sets its run tags, with why there is no program if there is none."""
        folder = architecture_folder(w, self.session, run_end=at_end)
        job.architecture = (architecture_path(w.prefix.removesuffix("-") or None), folder) if folder else None
        job.run_tags = dict(w.run_tags)
        if w.architecture.error:
            job.run_tags[RUN_TAG_ARCHITECTURE_ERROR] = (
                f"{w.name or type(w.model).__name__}: {w.architecture.error}"
            )
        return job

    def _training_state_at_step(self, w: Watched, step: int, epoch: int | None) -> Snapshot | None:
        if not self.session.config.log_training_state:
            return None
        if w.sharded:
            self.session.warn_once(
                "sharded-training-state",
                "log_training_state is not supported for sharded models yet: checkpoints hold the weights only",
            )
            return None
        state = {"version": 1, "step": step, "epoch": epoch, "ema": w.ema.state_dict(), "rng": rng_state()}
        if w.posthoc is not None:
            state["posthoc"] = w.posthoc.state_dict()
        return take_snapshot(state)

    def _parts(
        self, w: Watched, run_id: str, step: int, epoch: int | None, gathered: Any
    ) -> list[CheckpointPart]:
        states = gathered or (w.model.state_dict(), w.ema.model_state_dict())
        parts = []
        for kind, state in zip(("raw", "ema"), states, strict=True):
            record = self.session.ledger.add_checkpoint(
                run_id, kind, step, epoch, f"{w.prefix}{kind}-step{step}", self.session.optimizer_steps
            )
            if not gathered:
                snapshot = take_snapshot(state)
            else:  # CPU copies already; merged parts are assembled on the upload thread
                snapshot = state if isinstance(state, MergedParts) else Snapshot(state)
            parts.append(
                CheckpointPart(
                    record, snapshot,
                    ema_decay=w.ema.last_decay if kind == "ema" else None,
                    ema_updates=w.ema.num_updates if kind == "ema" else None,
                    init_fingerprint=w.ema.init_fingerprint,
                    tags={TAG_MODEL_NAME: w.label, **({TAG_MODEL: w.name} if w.name else {})},
                )
            )  # fmt: skip
        return parts

    def complete(self, w: Watched | None = None, *, run_id: str | None = None) -> None:
        """Take the optimizers' and schedulers' state of the checkpoints waiting for it (of
        ``w``, of the run ``run_id``, or all) and queue them for upload. If taking it fails,
        the weights are queued all the same, without a training state, then the error raised."""
        waiting, self.pending, error = self.pending, [], None
        for model, job, at_step in waiting:
            if (w is not None and model is not w) or (run_id is not None and job.run_id != run_id):
                self.pending.append((model, job, at_step))
                continue
            try:
                now = take_snapshot(
                    {"optimizers": [o.state_dict() for o in model.optimizers],
                     "schedulers": [s.state_dict() for s in model.schedulers]}
                )  # fmt: skip
                job.parts[0].training_state = MergedSnapshots([at_step, now])
            except Exception as e:
                error = error or e
            self.session.uploader.submit(job)
        if error is not None:
            raise error


def rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA) and Python RNG states, right after a step."""
    python = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": list(python[1]),
        "python_version": python[0],
        "python_gauss": python[2],
    }


# -- checkpoints of sharded models: every rank at once, failing on every rank alike -------------


def _sharded_states(w: Watched, step: int, parts_dir: str | None) -> Any:
    """A sharded model's full raw and EMA states for rank 0 (the other ranks get empty dicts
    or None), taken by every rank at once: gathered over the process group, or written by
    every rank into ``parts_dir`` and merged by rank 0 later. None: this step is taken
    already, or the part is off. Every rank runs its own work behind the boundary and the
    ranks agree (one ``all_reduce``) before the gather and after writing their parts, so a
    failure on one rank switches the part off on all of them: none waits for the others."""
    go, plan = BOUNDARY.prepare(SHARDED, _plan_sharded, w, step, parts_dir)
    if not go or plan is None:
        return None
    if plan == ():
        return BOUNDARY.call(SHARDED, gather_sharded, w.model, w.ema)
    wrote = BOUNDARY.call(SHARDED, _write_parts, w, plan)
    if not BOUNDARY.agree(SHARDED, wrote is not None):  # every part is written, or none is used
        if rank_zero():
            _discard(plan)
        return None
    import torch.distributed as dist

    world = dist.get_world_size()
    return (MergedParts(plan[0], world), MergedParts(plan[1], world)) if rank_zero() else None


def _plan_sharded(w: Watched, step: int, parts_dir: str | None) -> tuple[Path, ...] | None:
    """Local: None when ``step`` is taken already; ``()`` to gather; or the folders the ranks
    write their parts into (rank 0 clears what an interrupted job left there)."""
    if w.last_sharded_step == step:
        return None
    w.last_sharded_step = step
    if not parts_dir:
        return ()
    folder = Path(parts_dir)
    # alike on every rank (a model's name in its run is known on rank 0 alone)
    folders = (folder / f"model{w.index}-raw-step{step}", folder / f"model{w.index}-ema-step{step}")
    if rank_zero():
        _discard(folders)
    return folders


def _write_parts(w: Watched, folders: tuple[Path, ...]) -> bool:
    save_part(folders[0], w.model.state_dict())
    save_part(folders[1], w.ema.model_state_dict())
    return True


def _discard(states: Any) -> None:
    """Remove rank parts that will not be merged (folders, or :class:`MergedParts`)."""
    for item in states or ():
        if isinstance(item, MergedParts):
            item.discard()
        elif isinstance(item, Path):
            shutil.rmtree(item, ignore_errors=True)
