"""Input checks shared by the public API. Each raises one clear, one-line ValueError."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence


def _as_list(values: object, name: str) -> list:
    """Return the entries of a list-like ``values``; strings and non-iterables are refused."""
    try:
        if isinstance(values, (str, bytes)):
            raise TypeError("a string is not a sequence of numbers here")
        return list(values)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from None


def check_int(value: object, name: str, minimum: int | None = None) -> int:
    """Return ``value`` as a plain int if it is an integer (and at least ``minimum``, when given).

    Python and numpy integers (anything ``operator.index`` accepts) pass; bools and floats are
    refused, even integral ones such as ``2.0``, so a fractional count or seed fails here rather
    than being truncated or failing later in training.

    Raises:
        ValueError: If ``value`` is a bool, not an integer, or below ``minimum``.
    """
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        raise ValueError(f"{name} must be {expected} (not a bool), got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(number)


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
        ValueError: If ``rates`` is not a sequence, has the wrong length, or holds a rate
            that is not a number, is NaN or lies outside ``[0, 1)``.
    """
    values = _as_list(rates, name)
    if length is not None and len(values) != length:
        raise ValueError(f"expected {length} {name} (one per branch), got {len(values)}")
    return [check_rate(r, name=f"{name}[{i}]") for i, r in enumerate(values)]


def check_nonnegative(values: Sequence[float], name: str) -> list[float]:
    """Validate a list of finite, non-negative numbers (sensitivities, FLOPs).

    Raises:
        ValueError: If ``values`` is not a sequence, or an entry is not a number, or is
            NaN, infinite or negative.
    """
    out = []
    for i, v in enumerate(_as_list(values, name)):
        try:
            value = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name}[{i}] must be a number, got {v!r}") from None
        if math.isnan(value) or math.isinf(value) or value < 0:
            raise ValueError(f"{name}[{i}] must be finite and >= 0, got {v!r}")
        out.append(value)
    return out


def check_mask(mask: Sequence[bool], length: int) -> list[bool]:
    """Validate a forced drop mask (True = the branch's backward is dropped).

    Entries may be bools or the numbers 0 and 1 (ints, floats, numpy or 0-d torch
    values); anything else, such as a drop rate passed by mistake, is refused.

    Raises:
        ValueError: If ``mask`` is not a sequence, its length differs from the number of
            branches, or an entry is not a bool, 0 or 1.
    """
    values = []
    for i, m in enumerate(_as_list(mask, "mask")):
        if isinstance(m, bool):
            values.append(m)
            continue
        try:
            number = float(m)
        except (TypeError, ValueError):
            number = math.nan
        if number not in (0.0, 1.0):
            raise ValueError(f"mask[{i}] must be a bool (True = dropped), 0 or 1, got {m!r}")
        values.append(number == 1.0)
    if len(values) != length:
        raise ValueError(f"mask has {len(values)} entries but there are {length} branches")
    return values
