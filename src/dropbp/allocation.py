"""Drop-rate allocation under a FLOPs budget (pure functions, no torch).

The problem is::

    minimise    sum_l S_l * p_l**2
    subject to  sum_l F_l * p_l = target * sum_l F_l,   0 <= p_l <= max_rate

``S_l * p_l**2`` is the gradient-variance proxy whose marginal cost grows linearly with
``p_l``; it is the objective that the paper's 0.1-step greedy approximates. The KKT
conditions give ``p_l = min(max_rate, lam * F_l / (2 * S_l))`` (water-filling); the
water level ``lam`` is found exactly by walking the sorted breakpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from dropbp.validation import check_nonnegative

__all__ = ["allocate_drop_rates", "allocation_objective", "flops_weighted_rate"]


def _check_problem(
    sensitivity: Sequence[float], flops: Sequence[float], target: float, max_rate: float
) -> tuple[list[float], list[float], float, float]:
    sens = check_nonnegative(sensitivity, "sensitivity")
    fl = check_nonnegative(flops, "flops")
    if len(sens) != len(fl):
        raise ValueError(
            f"sensitivity has {len(sens)} entries but flops has {len(fl)}; pass one of each per branch"
        )
    max_rate = float(max_rate)
    if math.isnan(max_rate) or not 0.0 < max_rate < 1.0:
        raise ValueError(f"max_rate must be in (0, 1), got {max_rate!r}")
    target = float(target)
    if math.isnan(target) or not 0.0 <= target <= max_rate:
        raise ValueError(
            f"target must be in [0, max_rate={max_rate}], got {target!r}; "
            "no allocation can drop more than max_rate of the FLOPs"
        )
    return sens, fl, target, max_rate


def flops_weighted_rate(rates: Sequence[float], flops: Sequence[float]) -> float:
    """Return the fraction of branch FLOPs whose backward is dropped on average.

    Args:
        rates: Per-branch drop rates.
        flops: Per-branch forward FLOPs.

    Returns:
        ``sum(F_l p_l) / sum(F_l)``, or 0.0 when all FLOPs are zero.
    """
    total = sum(flops)
    return sum(f * p for f, p in zip(flops, rates)) / total if total > 0 else 0.0


def allocation_objective(sensitivity: Sequence[float], rates: Sequence[float]) -> float:
    """Return ``sum_l S_l * p_l**2``, the quantity the allocation minimises."""
    return sum(s * p * p for s, p in zip(sensitivity, rates))


def _water_fill(sens: list[float], fl: list[float], target: float, max_rate: float) -> list[float]:
    n = len(sens)
    budget = target * sum(fl)
    rates = [0.0] * n
    if budget <= 0.0:
        return rates

    free = [i for i in range(n) if sens[i] == 0.0]
    free_flops = sum(fl[i] for i in free)
    if free and free_flops * max_rate >= budget:
        # Zero-sensitivity branches cost nothing: they alone meet the target, so spread it evenly.
        level = budget / free_flops
        for i in free:
            rates[i] = level
        return rates
    for i in free:
        rates[i] = max_rate
    remaining = budget - max_rate * free_flops

    # Branches with S > 0 and F > 0: p = min(max_rate, lam * c) with c = F / (2 S).
    paid = [i for i in range(n) if sens[i] > 0.0 and fl[i] > 0.0]
    slope = {i: fl[i] / (2.0 * sens[i]) for i in paid}
    # Saturate in order of breakpoint lam_i = max_rate / slope_i; ties by index for determinism.
    order = sorted(paid, key=lambda i: (max_rate / slope[i], i))
    saturated_flops = 0.0
    lam = 0.0
    k = 0
    while k < len(order):
        # Summed afresh rather than decremented, so rounding cannot drive it to zero early.
        open_weight = sum(fl[i] * slope[i] for i in order[k:])
        lam = max(0.0, (remaining - max_rate * saturated_flops) / open_weight)
        if lam <= max_rate / slope[order[k]]:
            break
        saturated_flops += fl[order[k]]
        k += 1
    for rank, i in enumerate(order):
        rates[i] = max_rate if rank < k else min(max_rate, lam * slope[i])
    return rates


def _greedy(
    sens: list[float], fl: list[float], target: float, max_rate: float, step: float
) -> list[float]:
    n = len(sens)
    total = sum(fl)
    rates = [0.0] * n
    achieved = 0.0
    eps = 1e-12
    while achieved < target * total - eps:
        best, best_cost = None, math.inf
        for i in range(n):
            if fl[i] <= 0.0 or rates[i] + step > max_rate + eps:
                continue
            new = rates[i] + step
            cost = sens[i] * (new * new - rates[i] * rates[i]) / (fl[i] * step)
            if cost < best_cost:
                best, best_cost = i, cost
        if best is None:
            break
        rates[best] = min(max_rate, rates[best] + step)
        achieved = sum(f * p for f, p in zip(fl, rates))
    return rates


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
            the paper's heuristic: repeatedly raise by ``greedy_step`` the rate with the
            smallest objective increase per FLOP; it may overshoot the target by up to
            one step and is offered for comparison only.
        greedy_step: Increment of the greedy method.

    Returns:
        One drop rate per branch. With ``"exact"``, ``sum(F p) == target * sum(F)`` up to
        rounding. Zero-sensitivity branches are filled first; a branch with zero FLOPs
        and positive sensitivity gets 0.

    Raises:
        ValueError: On negative or NaN inputs, mismatched lengths, ``max_rate`` outside
            ``(0, 1)``, a target outside ``[0, max_rate]``, or an unknown method.
    """
    sens, fl, target, max_rate = _check_problem(sensitivity, flops, target, max_rate)
    if method == "exact":
        return _water_fill(sens, fl, target, max_rate)
    if method == "greedy":
        if not 0.0 < greedy_step <= max_rate:
            raise ValueError(f"greedy_step must be in (0, max_rate], got {greedy_step!r}")
        return _greedy(sens, fl, target, max_rate, greedy_step)
    raise ValueError(f"method must be 'exact' or 'greedy', got {method!r}")
