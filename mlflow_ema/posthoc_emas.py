"""The training side of post-hoc EMA: one power-function EMA per ``sigma_rel``, and when to
snapshot them (``autolog(posthoc_every_n_steps=N, posthoc_sigma_rels=(0.05, 0.10))``).

Each is an :class:`mlflow_ema.EMA` with :class:`mlflow_ema.PowerFunctionDecay`, so it is
updated by the same fused per-(device, dtype) ``_foreach_lerp_`` as the main EMA (which is
unchanged), kept in fp32 unless ``ema_dtype`` says otherwise, and a sharded (FSDP2) model's
keeps this rank's shards. Snapshots become LoggedModels named ``posthoc<sigma_rel>-step<N>``
(:mod:`mlflow_ema.checkpointing`); ``mlflow-ema posthoc`` combines them into any other length
(:mod:`mlflow_ema.posthoc_math`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from mlflow_ema.ema import EMA
from mlflow_ema.schedules import PowerFunctionDecay

STATE_VERSION = 1
DEFAULT_SIGMA_RELS = (0.05, 0.10)  # EDM2's pair: reconstructs 0.03 to 0.2 well


def sigma_rel_label(sigma_rel: float) -> str:
    """``sigma_rel`` as model names write it: MLflow refuses dots (``0.05`` -> ``0_05``)."""
    return str(float(sigma_rel)).replace(".", "_")


def check_posthoc_options(every_n_steps: Any, sigma_rels: Any) -> tuple[float, ...]:
    """The ValueError of invalid post-hoc options, else the ``sigma_rel`` values as floats."""
    if every_n_steps is not None and (
        not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1
    ):
        raise ValueError(f"posthoc_every_n_steps must be an integer >= 1, got {every_n_steps!r}")
    if isinstance(sigma_rels, (int, float)) or not isinstance(sigma_rels, Sequence):
        raise ValueError(f"posthoc_sigma_rels must be a sequence of numbers, got {sigma_rels!r}")
    values = tuple(PowerFunctionDecay(s).sigma_rel for s in sigma_rels)  # each in range
    if len(set(values)) != len(values) or len(values) < 2:
        raise ValueError(
            f"posthoc_sigma_rels needs at least two different values to reconstruct from, got {sigma_rels!r}"
        )
    return values


class PosthocEMAs:
    """The power-function EMAs of one model. Counters: each EMA's ``step`` (its updates:
    the optimizer steps since it was made, the ``t`` of its decay and of the snapshots'
    names); ``last_snapshot_step``, the step of the last snapshot taken (so the end of a
    run does not log that step twice)."""

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float],
        every_n_steps: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.emas = {
            s: EMA(model, decay=PowerFunctionDecay(s), dtype=dtype or torch.float32, device=device)
            for s in check_posthoc_options(every_n_steps, sigma_rels)
        }
        self.last_snapshot_step: int | None = None

    def __iter__(self) -> Iterator[tuple[float, EMA]]:
        return iter(self.emas.items())

    @property
    def step(self) -> int:
        return next(iter(self.emas.values())).step

    def update(self) -> None:
        for ema in self.emas.values():
            ema.update()

    def due(self) -> bool:
        """A snapshot is due: every ``every_n_steps`` updates."""
        return self.step > 0 and self.step % self.every_n_steps == 0 and self.last_snapshot_step != self.step

    def state_dict(self) -> dict[str, Any]:
        """Every EMA's state (for ``resume()`` and Lightning's ``.ckpt``); safe for
        ``torch.load(weights_only=True)``."""
        return {
            "version": STATE_VERSION,
            "last_snapshot_step": self.last_snapshot_step,
            "emas": [{"sigma_rel": s, "state": ema.state_dict()} for s, ema in self.emas.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: each ``sigma_rel`` configured now from its saved state.
        One with no saved state starts again (a warning); saved ones not configured are left."""
        saved = {float(item["sigma_rel"]): item["state"] for item in state["emas"]}
        for sigma_rel, ema in self.emas.items():
            if sigma_rel in saved:
                ema.load_state_dict(saved[sigma_rel])
        missing = sorted(set(self.emas) - set(saved))
        if missing:
            warnings.warn(
                f"mlflow-ema: the saved state has no post-hoc EMA of sigma_rel {', '.join(map(str, missing))}: "
                "it starts from the current weights, so its snapshots cannot be combined with earlier ones",
                stacklevel=3,
            )
        self.last_snapshot_step = state["last_snapshot_step"]
