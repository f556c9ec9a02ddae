"""The options of the training side, each declared once.

:class:`EMAOptions` are the EMA's (what :class:`mlflow_ema.EMA` takes, named as autolog
names them); :class:`AutologConfig` adds what autolog does with it. ``autolog(**options)``,
``watch`` (through autolog's configuration) and the Lightning ``EMACallback(**ema_options)``
take exactly these fields, and their signatures are made from them (:func:`signature_of`),
so adding an option is one field here plus its docs (the ``autolog`` docstring and the
README's table).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

from mlflow_ema.checkpoint import DEFAULT_MAX_SHARD_SIZE, parse_size
from mlflow_ema.posthoc_emas import DEFAULT_SIGMA_RELS, PosthocEMAs, check_posthoc_options
from mlflow_ema.schedules import DecaySchedule, WarmupDecay


def default_decay() -> DecaySchedule:
    """``WarmupDecay(0.9999, power=3/4)``: suits runs from a few hundred steps to ~100k."""
    return WarmupDecay(decay=0.9999, power=3 / 4)


@dataclasses.dataclass
class EMAOptions:
    """How the EMA averages (see :class:`mlflow_ema.EMA`)."""

    decay: float | DecaySchedule | None = dataclasses.field(
        default_factory=default_decay
    )  # None: the default
    update_every: int = 1
    start_step: int = 0
    ema_dtype: torch.dtype | None = None
    ema_device: str | torch.device | None = None
    # post-hoc EMA (mlflow_ema.posthoc_emas): snapshots of power-function EMAs every N steps
    posthoc_every_n_steps: int | None = None
    posthoc_sigma_rels: tuple[float, ...] = DEFAULT_SIGMA_RELS

    def __post_init__(self) -> None:
        if self.decay is None:
            self.decay = default_decay()
        self.posthoc_sigma_rels = check_posthoc_options(self.posthoc_every_n_steps, self.posthoc_sigma_rels)

    def ema_options(self) -> EMAOptions:
        """Only the EMA's options (of an :class:`AutologConfig`, say)."""
        return EMAOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EMAOptions)})

    def build(self, model: torch.nn.Module):
        """An :class:`mlflow_ema.EMA` of ``model`` with these options."""
        from mlflow_ema.ema import EMA

        return EMA(model, decay=self.decay, update_every=self.update_every, start_step=self.start_step,
                   dtype=self.ema_dtype, device=self.ema_device)  # fmt: skip

    def build_posthoc(self, model: torch.nn.Module) -> PosthocEMAs | None:
        """The post-hoc EMAs of ``model`` (None: post-hoc EMA is off)."""
        if self.posthoc_every_n_steps is None:
            return None
        return PosthocEMAs(model, self.posthoc_sigma_rels, self.posthoc_every_n_steps, dtype=self.ema_dtype,
                           device=self.ema_device)  # fmt: skip


@dataclasses.dataclass
class AutologConfig(EMAOptions):
    """What ``mlflow_ema.autolog(...)`` was given: see its docstring for each option."""

    checkpoint_every_n_steps: int | None = None
    checkpoint_every_n_epochs: int | None = None
    checkpoint_at_end: bool = True
    keep_top_k: int | None = None
    monitor: str | None = None
    mode: str = "max"
    log_training_state: bool = False
    model_factory: str | None = None
    model_kwargs: dict[str, Any] | None = None
    log_input_examples: bool = False  # the architecture folder keeps a real input's first rows
    max_queue: int = 2
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE
    ema_ranks: str = "all"  # or "zero": under DDP only rank 0 keeps the EMA
    sharded_save_dir: str | None = None  # sharded models: ranks write their parts, rank 0 merges
    silent: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep_top_k is not None and (self.keep_top_k < 1 or not self.monitor):
            raise ValueError("keep_top_k needs an integer >= 1 and a metric to monitor")
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {self.mode!r}")
        if self.ema_ranks not in ("all", "zero"):
            raise ValueError(f"ema_ranks must be 'all' or 'zero', got {self.ema_ranks!r}")
        for name in ("checkpoint_every_n_steps", "checkpoint_every_n_epochs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {self.max_queue!r}")
        self.max_shard_size = parse_size(self.max_shard_size)
        self.sharded_save_dir = str(self.sharded_save_dir) if self.sharded_save_dir else None


def signature_of(fn: Callable[..., Any], options: type, *, keep: tuple[str, ...] = ()) -> Callable[..., Any]:
    """Give ``fn(**options)`` the signature its options make: each field a keyword-only
    parameter with its default (``help()`` and editors show them), after ``fn``'s own
    parameters named in ``keep``. Returns ``fn``."""
    own = inspect.signature(fn).parameters
    head = [p for name, p in own.items() if name in keep]
    fields = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None if f.default is dataclasses.MISSING else f.default,
            annotation=f.type,
        )
        for f in dataclasses.fields(options)
        if f.name not in own
    ]
    tail = [p for name, p in own.items() if name not in keep and p.kind == inspect.Parameter.KEYWORD_ONLY]
    fn.__signature__ = inspect.Signature([*head, *fields, *tail])  # type: ignore[attr-defined]
    return fn
