"""Decay schedules for :class:`mlflow_ema.EMA`.

A schedule is any callable ``t -> decay`` where ``t`` counts EMA updates
(1 for the first averaging update; equal to optimizer steps with the default
``update_every=1``). The EMA update is ``shadow = decay * shadow + (1 - decay) * weights``,
so ``decay = 0`` copies the weights.

The classes here are small frozen dataclasses so that :meth:`EMA.state_dict`
can record them and a resumed run continues with the same schedule.

Bias correction. Adam-style EMAs start the average at zero and divide by
``1 - beta**t``. Expanding that recurrence shows it is *exactly* an EMA that
starts from any value and uses the time-varying decay
``beta * (1 - beta**(t-1)) / (1 - beta**t)``: zero at ``t = 1`` (the first
update copies the weights), approaching ``beta`` as ``t`` grows.
:class:`BiasCorrectedDecay` is that schedule. Starting the shadow from a copy
of the weights with a constant decay (the default) differs only in giving the
initial weights the weight ``beta**t``, which fades as training goes on; the
warmup schedules below shrink it faster by keeping the decay low early on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from mlflow_ema.posthoc_math import check_sigma_rel, power_beta, sigma_rel_to_gamma

DecaySchedule = Callable[[int], float]


def _check_decay(decay: float, name: str = "decay") -> None:
    if not (isinstance(decay, (int, float)) and 0.0 < decay < 1.0):
        raise ValueError(f"{name} must be a number in (0, 1), got {decay!r}")


def _check_positive(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ConstantDecay:
    """The same decay at every update (timm ModelEmaV3 and torch_ema's default)."""

    decay: float = 0.9999

    def __post_init__(self) -> None:
        _check_decay(self.decay)

    def __call__(self, t: int) -> float:
        return self.decay


@dataclasses.dataclass(frozen=True)
class WarmupDecay:
    """``1 - (1 + t / gamma) ** -power``, clamped to ``[min_decay, decay]`` (timm, diffusers).

    ``gamma=1, power=2/3`` suits runs of a million steps; ``power=3/4`` shorter ones.
    ``gamma=1, power=1`` gives ``1 - 1/(t+1)``: the plain running mean of all weights seen.
    """

    decay: float = 0.9999
    gamma: float = 1.0
    power: float = 2 / 3
    min_decay: float = 0.0

    def __post_init__(self) -> None:
        _check_decay(self.decay)
        _check_positive(self.gamma, "gamma")
        _check_positive(self.power, "power")
        if not 0.0 <= self.min_decay <= self.decay:
            raise ValueError(f"min_decay must be in [0, decay], got {self.min_decay!r}")

    def __call__(self, t: int) -> float:
        value = 1.0 - (1.0 + t / self.gamma) ** -self.power
        return max(self.min_decay, min(value, self.decay))


@dataclasses.dataclass(frozen=True)
class RampDecay:
    """``decay * (1 - exp(-t / tau))`` (YOLOv5's ModelEMA, ``tau=2000``)."""

    decay: float = 0.9999
    tau: float = 2000.0

    def __post_init__(self) -> None:
        _check_decay(self.decay)
        _check_positive(self.tau, "tau")

    def __call__(self, t: int) -> float:
        return self.decay * (1.0 - math.exp(-t / self.tau))


@dataclasses.dataclass(frozen=True)
class HalfLifeDecay:
    """A constant decay given as a half-life: after ``half_life`` updates a weight's
    contribution to the average has halved (``decay = 0.5 ** (1 / half_life)``).

    The half-life counts EMA updates: with ``update_every=N`` it is ``N * half_life``
    optimizer steps.
    """

    half_life: float = 1000.0

    def __post_init__(self) -> None:
        _check_positive(self.half_life, "half_life")

    @property
    def decay(self) -> float:
        return 0.5 ** (1.0 / self.half_life)

    def __call__(self, t: int) -> float:
        return self.decay


@dataclasses.dataclass(frozen=True)
class BiasCorrectedDecay:
    """The EMA that Adam-style bias correction computes (see the module docstring):
    ``decay * (1 - decay**(t-1)) / (1 - decay**t)``."""

    decay: float = 0.999

    def __post_init__(self) -> None:
        _check_decay(self.decay)

    def __call__(self, t: int) -> float:
        b = self.decay
        return b * (1.0 - b ** (t - 1)) / (1.0 - b**t)


@dataclasses.dataclass(frozen=True)
class PowerFunctionDecay:
    """The power-function EMA of EDM2 (Karras et al. 2024): ``(1 - 1/t) ** (gamma + 1)``,
    its length given as ``sigma_rel``, the width of its averaging profile relative to the
    training so far (0.05 to 0.10 are typical; at most ``1/sqrt(12)``, the plain mean).
    Unlike a constant decay its length grows with training: at step ``t`` it averages
    about the last ``sigma_rel * t * sqrt(12)`` steps' worth. The first update copies the
    weights. See :mod:`mlflow_ema.posthoc_math` for ``gamma``; post-hoc EMA combines
    snapshots of two such EMAs into any other length after training."""

    sigma_rel: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma_rel", check_sigma_rel(self.sigma_rel))

    @property
    def gamma(self) -> float:
        return sigma_rel_to_gamma(self.sigma_rel)

    def __call__(self, t: int) -> float:
        return power_beta(t, self.gamma)


_SCHEDULES = {
    cls.__name__: cls
    for cls in (ConstantDecay, WarmupDecay, RampDecay, HalfLifeDecay, BiasCorrectedDecay, PowerFunctionDecay)
}


def as_schedule(decay: float | DecaySchedule) -> DecaySchedule:
    """A float means a constant decay; a callable is used as it is."""
    if callable(decay):
        return decay
    return ConstantDecay(decay)


def schedule_to_dict(schedule: DecaySchedule) -> dict[str, Any]:
    """A JSON-able description; ``{"name": "custom", ...}`` for callables of the user's own."""
    if type(schedule) in _SCHEDULES.values():
        return {"name": type(schedule).__name__, **dataclasses.asdict(schedule)}
    return {"name": "custom", "repr": repr(schedule)}


def schedule_from_dict(config: dict[str, Any]) -> DecaySchedule | None:
    """The schedule :func:`schedule_to_dict` described, or None for a custom one."""
    cls = _SCHEDULES.get(config.get("name", ""))
    if cls is None:
        return None
    return cls(**{k: v for k, v in config.items() if k != "name"})
