"""Drop-rate allocation under a FLOPs budget (pure functions, no torch).

The problem is::

    minimise    sum_l S_l * p_l**2
    subject to  sum_l F_l * p_l = target * sum_l F_l,   0 <= p_l <= max_rate

``S_l * p_l**2`` is the gradient-variance proxy whose marginal cost grows linearly with
``p_l``; it is the objective that the paper's 0.1-step greedy approximates. The KKT
conditions give ``p_l = min(max_rate, lam * F_l / (2 * S_l))`` (water-filling); the
water level ``lam`` is found exactly by walking the sorted breakpoints.

Both solvers work in exact rational arithmetic (``fractions.Fraction``; every float is a
dyadic rational) and round each rate to the nearest float once, at the end. Sensitivities
and FLOPs may therefore span the whole float range (``5e-324`` to ``1e308``, zeros
included) without overflow, underflow or cancellation, and every returned allocation
meets the target to within the rounding of the returned rates (a relative error of
about ``2**-53``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Literal

from dropbp.validation import check_nonnegative

__all__ = ["allocate_drop_rates", "allocation_objective", "flops_weighted_rate"]

# The greedy raises one rate by one step per iteration; more steps than this per branch
# means a step too small to finish in reasonable time (use method="exact" instead).
_MAX_GREEDY_STEPS_PER_BRANCH = 10_000


def _check_problem(
    sensitivity: Sequence[float], flops: Sequence[float], target: float, max_rate: float
) -> tuple[list[float], list[float], float, float]:
    sens = check_nonnegative(sensitivity, "sensitivity")
    fl = check_nonnegative(flops, "flops")
    if len(sens) != len(fl):
        raise ValueError(
            f"sensitivity has {len(sens)} entries but flops has {len(fl)}; pass one of each per branch"
        )
    max_rate = _as_float(max_rate, "max_rate")
    if math.isnan(max_rate) or not 0.0 < max_rate < 1.0:
        raise ValueError(f"max_rate must be in (0, 1), got {max_rate!r}")
    target = _as_float(target, "target")
    if math.isnan(target) or not 0.0 <= target <= max_rate:
        raise ValueError(
            f"target must be in [0, max_rate={max_rate}], got {target!r}; "
            "no allocation can drop more than max_rate of the FLOPs"
        )
    if target > 0.0 and not any(f > 0.0 for f in fl):
        raise ValueError(
            f"all {len(fl)} branch FLOPs are zero, so no drop rates can drop a fraction "
            f"target={target!r} of them; pass measured FLOPs or target=0"
        )
    return sens, fl, target, max_rate


def _as_float(value: object, name: str) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def flops_weighted_rate(rates: Sequence[float], flops: Sequence[float]) -> float:
    """Return the fraction of branch FLOPs whose backward is dropped on average.

    Args:
        rates: Per-branch drop rates.
        flops: Per-branch forward FLOPs.

    Returns:
        ``sum(F_l p_l) / sum(F_l)``, or 0.0 when all FLOPs are zero. FLOPs are scaled
        by their maximum first, so huge or tiny values neither overflow nor underflow.
    """
    largest = max(flops, default=0.0)
    if not largest > 0:
        return 0.0
    scaled = [f / largest for f in flops]
    return math.fsum(f * p for f, p in zip(scaled, rates)) / math.fsum(scaled)


def allocation_objective(sensitivity: Sequence[float], rates: Sequence[float]) -> float:
    """Return ``sum_l S_l * p_l**2``, the quantity the allocation minimises."""
    return math.fsum(s * p * p for s, p in zip(sensitivity, rates))


def _water_fill(sens: list[float], fl: list[float], target: float, max_rate: float) -> list[float]:
    n = len(sens)
    rates = [0.0] * n
    if target == 0.0:
        return rates
    S = [Fraction(s) for s in sens]
    F = [Fraction(f) for f in fl]
    cap = Fraction(max_rate)
    budget = Fraction(target) * sum(F)  # > 0: _check_problem refused all-zero FLOPs

    free = [i for i in range(n) if S[i] == 0]
    free_flops = sum((F[i] for i in free), Fraction(0))
    if free_flops * cap >= budget:
        # Zero-sensitivity branches cost nothing: they alone meet the target, so spread it evenly.
        level = float(budget / free_flops)
        for i in free:
            rates[i] = level
        return rates
    for i in free:
        rates[i] = max_rate
    remaining = budget - cap * free_flops  # > 0, and <= cap * (FLOPs of the paid branches)

    # Branches with S > 0 and F > 0: p = min(cap, level * F / S) (level = lam / 2), which
    # saturates once level >= cap * S / F. Walk the breakpoints in increasing order (ties
    # by index, for determinism); all in exact arithmetic, so nothing drifts.
    paid = [i for i in range(n) if S[i] > 0 and F[i] > 0]
    ratio = {i: S[i] / F[i] for i in paid}
    order = sorted(paid, key=lambda i: (ratio[i], i))
    open_weight = sum((F[i] / ratio[i] for i in paid), Fraction(0))  # sum F^2 / S over open
    saturated = 0
    level = Fraction(0)
    while saturated < len(order):
        i = order[saturated]
        level = remaining / open_weight
        if level <= cap * ratio[i]:
            break
        remaining -= cap * F[i]
        open_weight -= F[i] / ratio[i]
        saturated += 1
    for rank, i in enumerate(order):
        rates[i] = max_rate if rank < saturated else float(min(cap, level / ratio[i]))
    return rates


def _greedy(
    sens: list[float], fl: list[float], target: float, max_rate: float, step: float
) -> list[float]:
    n = len(sens)
    rates = [0.0] * n
    if target == 0.0:
        return rates
    S = [Fraction(s) for s in sens]
    F = [Fraction(f) for f in fl]
    cap, delta = Fraction(max_rate), Fraction(step)
    remaining = Fraction(target) * sum(F)
    current = [Fraction(0)] * n
    # Raising p by delta costs S ((p + delta)^2 - p^2) and drops F delta FLOPs; the price per
    # FLOP is S (2 p + delta) / F. Cheapest first, ties by index. A step that would pass
    # max_rate stops at max_rate, and the last step stops exactly at the target.
    heap = [(S[i] * delta / F[i], i) for i in range(n) if F[i] > 0]
    heapq.heapify(heap)
    while remaining > 0:
        _, i = heapq.heappop(heap)  # never empty: target <= max_rate leaves room
        rise = min(delta, cap - current[i], remaining / F[i])
        current[i] += rise
        remaining -= rise * F[i]
        if current[i] < cap:
            heapq.heappush(heap, (S[i] * (2 * current[i] + delta) / F[i], i))
    return [float(p) for p in current]


def allocate_drop_rates(
    sensitivity: Sequence[float],
    flops: Sequence[float],
    target: float,
    max_rate: float = 0.9,
    method: Literal["exact", "greedy"] = "exact",
    greedy_step: float = 0.1,
) -> list[float]:
    """Choose per-branch drop rates that meet a FLOPs budget at the least gradient variance.

    Args:
        sensitivity: Per-branch sensitivity ``S_l >= 0`` (from ``handle.sensitivity``).
        flops: Per-branch forward FLOPs ``F_l >= 0``.
        target: The fraction of branch FLOPs whose backward is dropped on average,
            in ``[0, max_rate]``.
        max_rate: Upper bound on every rate, in ``(0, 1)``.
        method: ``"exact"`` solves the problem exactly (water-filling). ``"greedy"`` is
            the paper's heuristic, offered for comparison: repeatedly raise by
            ``greedy_step`` the rate with the smallest objective increase per FLOP. A
            step stops early at ``max_rate``, and the last step stops exactly at the
            target, so the greedy meets the target too (its objective is never lower).
        greedy_step: Increment of the greedy method, in ``(0, 1]`` (a step that would
            pass ``max_rate`` stops at it).

    Returns:
        One drop rate per branch, each in ``[0, max_rate]``, with
        ``sum(F p) == target * sum(F)`` up to the rounding of the returned floats
        (relative error about ``2**-53``). Zero-sensitivity branches are filled first
        (by ``"exact"``: evenly, if they alone can meet the target); a branch with zero
        FLOPs and positive sensitivity gets 0.

    Raises:
        ValueError: On negative, infinite or NaN inputs, mismatched lengths, ``max_rate``
            outside ``(0, 1)``, a target outside ``[0, max_rate]``, a positive target
            when all FLOPs are zero, an unknown method, or a ``greedy_step`` outside
            ``(0, 1]`` or so small that the greedy would take more than
            10,000 steps per branch.
    """
    sens, fl, target, max_rate = _check_problem(sensitivity, flops, target, max_rate)
    if method == "exact":
        return _water_fill(sens, fl, target, max_rate)
    if method == "greedy":
        greedy_step = _as_float(greedy_step, "greedy_step")
        if not 0.0 < greedy_step <= 1.0:
            raise ValueError(f"greedy_step must be in (0, 1], got {greedy_step!r}")
        if max_rate / greedy_step > _MAX_GREEDY_STEPS_PER_BRANCH:
            raise ValueError(
                f"greedy_step={greedy_step!r} needs more than {_MAX_GREEDY_STEPS_PER_BRANCH} steps "
                f"per branch to reach max_rate={max_rate}; use a larger step or method='exact'"
            )
        return _greedy(sens, fl, target, max_rate, greedy_step)
    raise ValueError(f"method must be 'exact' or 'greedy', got {method!r}")
