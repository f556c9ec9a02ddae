"""The maths of post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics
of Diffusion Models", CVPR 2024, section 3 and appendix C), derived here from first principles.

A *power-function EMA* of exponent ``gamma`` updates at step ``t = 1, 2, ...`` with

    beta(t) = (1 - 1/t) ** (gamma + 1)        (beta(1) = 0: the first update copies)

so at step ``t`` it weighs the weights after step ``s`` by exactly
``(s**(gamma+1) - (s-1)**(gamma+1)) / t**(gamma+1)``: in continuous time the profile

    p_t(tau) = (gamma + 1) * tau**gamma / t**(gamma+1),   0 <= tau <= t

(it integrates to 1). Its length is given as ``sigma_rel``, the standard deviation of that
profile relative to ``t``: ``sigma_rel**2 = (gamma+1) / ((gamma+2)**2 (gamma+3))``. For a
given ``sigma_rel``, ``gamma`` is the largest root of the cubic

    gamma**3 + 7 gamma**2 + (16 - s) gamma + (12 - s) = 0,   s = sigma_rel**-2,

which has exactly one root >= 0 when ``0 < sigma_rel <= 1/sqrt(12)`` (``gamma = 0``, the
longest: the plain mean of every step's weights).

Two profiles' inner product has a closed form. With ``t_a <= t_b``:

    <p_a, p_b> = (gamma_a+1)(gamma_b+1) / ((gamma_a+gamma_b+1) t_b) * (t_a/t_b)**gamma_b

An EMA snapshot is a weighted sum of the training weights by its profile, so a linear
combination of snapshots is a weighted sum by the same combination of profiles. The
coefficients ``x`` whose profile is nearest (least squares, in L2) to the target's solve
``A x = b`` with ``A[i, j] = <p_i, p_j>`` and ``b[i] = <p_i, p_target>``. They are then
divided by their sum, so the weights still add up to 1 (the reconstruction of a constant
is that constant). Some of them may be negative.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np

from mlflow_ema.errors import PosthocError

MAX_SIGMA_REL = 1 / math.sqrt(12)  # gamma = 0: the plain mean of every step
REFUSED_CONDITION = 1e12  # above: the snapshots cannot tell the target apart (singular)
WARNED_CONDITION = 1e8  # long runs with many snapshots reach 1e7 normally


def check_sigma_rel(sigma_rel: float, *, what: str = "sigma_rel") -> float:
    """``sigma_rel`` as a float, or a :class:`PosthocError` naming the valid range."""
    try:
        value = float(sigma_rel)
    except (TypeError, ValueError):
        raise PosthocError(f"{what} must be a number, got {sigma_rel!r}") from None
    if not (0.0 < value <= MAX_SIGMA_REL):
        raise PosthocError(
            f"{what} must be in (0, {MAX_SIGMA_REL:.4f}] (1/sqrt(12): the plain mean), got {value!r}"
        )
    return value


@functools.lru_cache(maxsize=256)  # called at every update of a power-function EMA
def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma >= 0`` of the power-function EMA whose relative length is
    ``sigma_rel`` (see the module docstring)."""
    s = check_sigma_rel(sigma_rel) ** -2
    lo, hi = 0.0, s  # the cubic is < 0 at 0 (s >= 12) and > 0 at s
    for _ in range(200):  # bisection to float precision: robust for every sigma_rel
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if ((mid + 7) * mid + 16 - s) * mid + 12 - s < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def power_beta(t: int, gamma: float) -> float:
    """The decay of a power-function EMA at its ``t``-th update (``t >= 1``)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_dot(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """The inner products of power-function profiles (element-wise, broadcast)."""
    t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(
        *(np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    )
    longer = np.maximum(t_a, t_b)
    shorter = np.minimum(t_a, t_b)
    exponent = np.where(t_a <= t_b, gamma_b, gamma_a)  # the longer profile's gamma
    scale = (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * longer)
    return scale * (shorter / longer) ** exponent


def posthoc_coefficients(
    snapshot_steps: Sequence[int],
    snapshot_sigma_rels: Sequence[float],
    target_step: int,
    target_sigma_rel: float,
) -> np.ndarray:
    """The coefficients that combine power-function EMA snapshots into the EMA of
    ``target_sigma_rel`` at ``target_step``: one per snapshot, float64, summing to 1.

    Snapshot ``i`` is the EMA of ``snapshot_sigma_rels[i]`` at optimizer step
    ``snapshot_steps[i]`` (its update count). Only snapshots taken at or before
    ``target_step`` take part; the others get 0. The solve is the least-squares fit of
    the target's profile by the snapshots' profiles, then normalized (module docstring).

    Raises :class:`mlflow_ema.PosthocError` (one line) for no snapshots, a single
    ``sigma_rel``, a target step beyond the last snapshot, duplicate snapshots or a
    singular system (condition number above 1e12); warns above 1e8 and for a target
    outside the tracked range of ``sigma_rel``.
    """
    steps, sigmas, target = _checked(snapshot_steps, snapshot_sigma_rels, target_step, target_sigma_rel)
    target_sigma_rel = check_sigma_rel(target_sigma_rel, what="target sigma_rel")
    used = steps <= target
    if len(set(sigmas[used].tolist())) < 2:
        raise PosthocError(
            f"reconstructing at step {target} needs snapshots of at least two sigma_rel values taken by then; "
            f"there {'is one' if used.any() else 'are none'} ({_listing(steps[used], sigmas[used])})"
        )
    if not sigmas.min() <= target_sigma_rel <= sigmas.max():
        warnings.warn(
            f"mlflow-ema: sigma_rel {target_sigma_rel:g} is outside the tracked range "
            f"[{sigmas.min():g}, {sigmas.max():g}]: the reconstruction is less accurate there",
            stacklevel=2,
        )
    t, gamma = steps[used], np.array([sigma_rel_to_gamma(s) for s in sigmas[used]])
    gram = profile_dot(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
    condition = float(np.linalg.cond(gram))
    if not condition < REFUSED_CONDITION:  # NaN included
        raise PosthocError(
            f"the snapshots' system is singular (condition number {condition:.3g} > {REFUSED_CONDITION:.0e}): "
            "they are too alike to tell EMA lengths apart"
        )
    if condition > WARNED_CONDITION:
        warnings.warn(
            f"mlflow-ema: the snapshots' system is ill-conditioned (condition number {condition:.3g}): "
            "the reconstruction may be inaccurate",
            stacklevel=2,
        )
    rhs = profile_dot(t, gamma, float(target), sigma_rel_to_gamma(target_sigma_rel))
    solution = np.linalg.solve(gram, rhs)
    coefficients = np.zeros(len(steps), dtype=np.float64)
    coefficients[used] = solution / solution.sum()
    return coefficients


def _checked(
    snapshot_steps: Sequence[int],
    snapshot_sigma_rels: Sequence[float],
    target_step: int,
    target_sigma_rel: float,
) -> tuple[np.ndarray, np.ndarray, int]:
    if len(snapshot_steps) != len(snapshot_sigma_rels):
        raise PosthocError(
            f"{len(snapshot_steps)} snapshot steps but {len(snapshot_sigma_rels)} sigma_rel values: give one per snapshot"
        )
    if len(snapshot_steps) == 0:
        raise PosthocError("no snapshots: log them with autolog(posthoc_every_n_steps=N)")
    steps = np.array([_step(s, "snapshot step") for s in snapshot_steps], dtype=np.float64)
    sigmas = np.array([check_sigma_rel(s, what="snapshot sigma_rel") for s in snapshot_sigma_rels])
    target = _step(target_step, "target step")
    if target > steps.max():
        raise PosthocError(
            f"target step {target} is beyond the last snapshot (step {int(steps.max())}): nothing records "
            "the weights after it"
        )
    pairs = list(zip(steps.tolist(), sigmas.tolist(), strict=True))
    duplicates = {p for p in pairs if pairs.count(p) > 1}
    if duplicates:
        step, sigma = min(duplicates)
        raise PosthocError(f"two snapshots of sigma_rel {sigma:g} at step {int(step)}: give each once")
    return steps, sigmas, target


def _step(value: object, what: str) -> int:
    """An optimizer step: an int (or an integral float, numpy's included) >= 1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PosthocError(f"{what} must be an integer >= 1 (optimizer steps), got {value!r}")
    if not (math.isfinite(value) and float(value).is_integer() and value >= 1):
        raise PosthocError(f"{what} must be an integer >= 1 (optimizer steps), got {value!r}")
    return int(value)


def _listing(steps: np.ndarray, sigmas: np.ndarray) -> str:
    if not len(steps):
        return "no snapshot"
    values = sorted(set(sigmas.tolist()))
    return f"{len(steps)} snapshot(s) of sigma_rel {', '.join(f'{v:g}' for v in values)}"
