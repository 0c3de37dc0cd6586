"""Drop-rate schedules: the drop rate in force at each mask step, as a pure function.

A schedule turns the configured rate ``p`` into a rate ``r(t)`` for mask step ``t`` of a
run of ``total`` mask steps. Per-branch rates (uniform, or allocated from sensitivity) are
all scaled by ``r(t) / p``, so the mask of step ``t`` stays a pure function of
``(seed, t, rates at t)``: every rank draws the same mask and a resumed run continues
bitwise as the uninterrupted one.

Specs (the same strings for :class:`dropbp.DropBPConfig`, the callback, ``--drop-schedule``
and the Axolotl key ``dropbp_drop_schedule``):

==================  ====================================================================
``constant``        ``p`` throughout (the default)
``warmup:F``        from 0 up to ``p``, linearly over the first fraction ``F`` of the run
``cooldown:F``      from ``p`` down to 0, linearly over the last fraction ``F`` of the run
``linear:A:B``      from rate ``A`` to rate ``B``, linearly over the run
``cosine:A:B``      from rate ``A`` to rate ``B`` along a half cosine (slow at both ends)
==================  ====================================================================

In Python a schedule may also be any callable ``step -> rate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DropSchedule", "MAX_SCHEDULED_RATE", "parse_schedule", "scheduled_rates"]

#: A scaled rate is clipped here: a rate of 1 would drop a branch in every step.
MAX_SCHEDULED_RATE = 0.99

_KINDS = {"constant": 0, "warmup": 1, "cooldown": 1, "linear": 2, "cosine": 2}
_USAGE = "constant, warmup:F, cooldown:F, linear:A:B or cosine:A:B (F a fraction in (0, 1], A and B rates in [0, 1))"


@dataclass(frozen=True)
class DropSchedule:
    """A parsed schedule spec.

    Attributes:
        kind: ``"constant"``, ``"warmup"``, ``"cooldown"``, ``"linear"`` or ``"cosine"``.
        values: The spec's numbers: ``(F,)`` for warm-up and cool-down, ``(A, B)`` for the ramps.
    """

    kind: str
    values: tuple[float, ...] = ()

    def rate(self, step: int, total: int, base: float) -> float:
        """The rate in force at mask step ``step`` of ``total``, for the configured rate ``base``.

        Raises:
            ValueError: If ``total`` is needed (every kind but ``constant``) and is below 1.
        """
        if self.kind == "constant":
            return base
        if total < 1:
            raise ValueError(f"the drop schedule {self.spec!r} needs the run's total steps (>= 1), got {total!r}")
        if self.kind in ("warmup", "cooldown"):
            span = max(1.0, self.values[0] * total)
            done = step if self.kind == "warmup" else total - 1 - step  # 0 at the first (last) step
            return base * min(1.0, max(0.0, done / span))
        start, end = self.values
        progress = min(1.0, step / (total - 1)) if total > 1 else 1.0
        if self.kind == "cosine":
            progress = (1.0 - math.cos(math.pi * progress)) / 2.0
        return start + (end - start) * progress

    @property
    def spec(self) -> str:
        """The spec string this schedule was parsed from (normalised)."""
        return ":".join([self.kind, *(f"{v:g}" for v in self.values)])


def parse_schedule(spec: str) -> DropSchedule:
    """Parse a schedule spec (see the module docstring).

    Raises:
        ValueError: On an unknown kind, a wrong number of values, or a value out of range;
            the message lists the valid forms.
    """
    if not isinstance(spec, str):
        raise ValueError(f"drop_schedule must be a string ({_USAGE}), got {spec!r}")
    kind, *parts = spec.strip().lower().split(":")
    if kind not in _KINDS or len(parts) != _KINDS[kind]:
        raise ValueError(f"drop_schedule {spec!r} is not one of {_USAGE}")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"drop_schedule {spec!r} has a value that is not a number; use {_USAGE}") from None
    if kind in ("warmup", "cooldown") and not 0.0 < values[0] <= 1.0:
        raise ValueError(f"drop_schedule {spec!r}: the fraction must be in (0, 1], got {values[0]:g}")
    if kind in ("linear", "cosine") and not all(0.0 <= v < 1.0 for v in values):
        raise ValueError(f"drop_schedule {spec!r}: the rates must be in [0, 1)")
    return DropSchedule(kind, values)


def scheduled_rates(
    rates: list[float], schedule: DropSchedule | Callable[[int], float], step: int, total: int, base: float
) -> list[float]:
    """Per-branch rates at ``step``: each of ``rates`` scaled by ``schedule``'s rate over ``base``.

    Args:
        rates: The per-branch rates the schedule scales (uniform or allocated).
        schedule: A :class:`DropSchedule`, or a callable ``step -> rate``.
        step: The mask step.
        total: Mask steps in the run (for the fraction-based kinds).
        base: The configured rate that ``rates`` realise (their target); where it is 0,
            every branch gets the scheduled rate.

    Returns:
        The rates, each clipped to ``[0, MAX_SCHEDULED_RATE]``.

    Raises:
        ValueError: If a callable returns a rate that is NaN or outside ``[0, 1)``.
    """
    rate = schedule.rate(step, total, base) if isinstance(schedule, DropSchedule) else float(schedule(step))
    if math.isnan(rate) or not 0.0 <= rate < 1.0:
        raise ValueError(f"the drop schedule gave the rate {rate!r} at step {step}; a rate must be in [0, 1)")
    if base <= 0.0:
        return [rate] * len(rates)
    scale = rate / base
    return [min(MAX_SCHEDULED_RATE, r * scale) for r in rates]
