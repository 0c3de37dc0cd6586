"""Input checks shared by the public API. Each raises one clear ValueError."""

from __future__ import annotations

import math
from collections.abc import Sequence


def check_rate(rate: float, name: str = "drop_rate") -> float:
    """Return ``rate`` as a float if it lies in ``[0, 1)``.

    Raises:
        ValueError: If the rate is not a number, is NaN, or lies outside ``[0, 1)``.
    """
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {rate!r}") from None
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"{name} must be in [0, 1) (1 would never train the branch), got {rate!r}"
        )
    return value


def check_rates(rates: Sequence[float], length: int | None = None, name: str = "drop rates") -> list[float]:
    """Validate a per-branch rate list and return it as floats.

    Raises:
        ValueError: On a wrong length, or any rate that is NaN or outside ``[0, 1)``.
    """
    values = list(rates)
    if length is not None and len(values) != length:
        raise ValueError(f"expected {length} {name} (one per branch), got {len(values)}")
    return [check_rate(r, name=f"{name}[{i}]") for i, r in enumerate(values)]


def check_nonnegative(values: Sequence[float], name: str) -> list[float]:
    """Validate a list of finite, non-negative numbers (sensitivities, FLOPs).

    Raises:
        ValueError: On a NaN, infinite or negative entry.
    """
    out = []
    for i, v in enumerate(values):
        value = float(v)
        if math.isnan(value) or math.isinf(value) or value < 0:
            raise ValueError(f"{name}[{i}] must be finite and >= 0, got {v!r}")
        out.append(value)
    return out


def check_mask(mask: Sequence[bool], length: int) -> list[bool]:
    """Validate a forced drop mask.

    Raises:
        ValueError: If its length differs from the number of branches.
    """
    values = [bool(m) for m in mask]
    if len(values) != length:
        raise ValueError(f"mask has {len(values)} entries but there are {length} branches")
    return values
