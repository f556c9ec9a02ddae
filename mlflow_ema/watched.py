"""The models a session keeps an EMA of, and what drives each one."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from torch import nn

from mlflow_ema.capture import Architecture
from mlflow_ema.ema import EMA
from mlflow_ema.posthoc_emas import PosthocEMAs

Driver = Literal["autolog", "watch", "lightning"]  # who steps the EMA: autolog's hooks, watch's, the callback


@dataclasses.dataclass(eq=False)
class Watched:
    """A model the session keeps an EMA of. Its counters:

    - ``optimizer_steps``: steps of its (first) optimizer the hooks saw; step checkpoints
      fall due on it, the same on every rank;
    - ``epochs``: epochs that ended while it trained (exhausted ``DataLoader`` iterators);
    - ``ema.step`` / ``ema.num_updates`` (on the EMA): updates asked for / averaged;
    - ``posthoc.step`` / ``posthoc.last_snapshot_step``: see :class:`PosthocEMAs`.
    """

    model: nn.Module
    ema: EMA
    optimizers: list[Any]
    schedulers: list[Any]
    name: str | None
    driver: Driver
    run_tags: dict[str, str]  # set on its run with the first checkpoint
    epochs: int = 0
    optimizer_steps: int = 0
    run_id: str | None = None  # the active run at its last step: the run it belongs to
    sharded: bool = False  # DTensor parameters (FSDP2): checkpoints are collectives
    last_sharded_step: int | None = None  # step of a sharded model's last checkpoint, alike on every rank
    architecture: Architecture = dataclasses.field(default_factory=Architecture)  # see mlflow_ema.capture
    entry: nn.Module | None = None  # what the loop calls (a DDP / torch.compile wrapper), if not the model
    index: int = 0  # its place among the session's watched models: the same on every rank
    posthoc: PosthocEMAs | None = None  # its power-function EMAs, when post-hoc EMA is on

    label: str = ""  # its name among the run's models (checkpoint names, mlflow_ema.model_name)
    several: bool = False  # its run trains several models: its checkpoint names start with label

    @property
    def prefix(self) -> str:
        """Checkpoint names start with the model's name when it was given (``watch(name=)``)
        or when its run trains several models: ``<name>-raw-step<N>``."""
        return f"{self.label or self.name}-" if self.name or self.several else ""
