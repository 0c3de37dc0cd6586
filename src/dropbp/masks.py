"""Stateless, variance-reduced sampling of per-step drop masks.

A mask is a pure function of ``(seed, step, rates)``. Every data-parallel rank that
shares the seed and the step counter draws the same mask without communicating, a run
is reproducible, and resuming needs only the step counter.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from dropbp.validation import check_rates

_MASK64 = (1 << 64) - 1


def _mix(seed: int, step: int) -> int:
    """Hash ``(seed, step)`` into a 64-bit generator seed (splitmix64 finaliser).

    Consecutive steps must give unrelated streams; seeding ``random.Random`` with
    ``seed + step`` would make nearby seeds of different runs share masks.
    """
    z = (seed * 0x9E3779B97F4A7C15 + step + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample_mask(seed: int, step: int, rates: Sequence[float]) -> list[bool]:
    """Draw the drop mask of one training step by systematic sampling.

    The branches are visited in a per-step random order; their rates are laid end to end
    on a line, and the points ``u, u + 1, u + 2, ...`` (one uniform offset ``u``) pick the
    branches to drop. Each branch is dropped with probability exactly equal to its rate,
    and the number dropped is always ``floor`` or ``ceil`` of ``sum(rates)``.

    Python's ``random.Random`` is used rather than torch's generator so the stream does
    not depend on the torch version or device.

    Args:
        seed: Run seed shared by all ranks.
        step: Zero-based step counter.
        rates: Per-branch drop rates, each in ``[0, 1)``.

    Returns:
        One bool per branch, True where the branch's backward is dropped.

    Raises:
        ValueError: If a rate is NaN or outside ``[0, 1)``, or ``step`` is negative.
    """
    rates = check_rates(rates)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    rng = random.Random(_mix(int(seed), int(step)))
    order = list(range(len(rates)))
    rng.shuffle(order)
    offset = rng.random()
    mask = [False] * len(rates)
    start = 0.0
    for index in order:
        end = start + rates[index]
        # A point k + offset falls in [start, end) iff the counts of points below differ.
        if math.floor(end - offset) > math.floor(start - offset):
            mask[index] = True
        start = end
    return mask
