"""Stateless sampling of per-step drop masks: random (variance-reduced) or structured.

A mask is a pure function of ``(seed, step, rates)``. Every data-parallel rank that
shares the seed and the step counter draws the same mask without communicating, a run
is reproducible, and resuming needs only the step counter.

The function is fully specified here, down to the bit, and uses only integer
arithmetic: it does not depend on the Python version (``random.Random`` makes no
promise to keep its streams), on torch, on numpy, on the device or on the platform.
``tests/test_masks.py`` pins golden values and checks them against an independent
re-implementation. Changing any step below changes users' masks and must be treated
as a breaking change.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from fractions import Fraction

from dropbp.validation import check_rates

__all__ = ["MASK_MODES", "sample_mask", "sample_structured_mask"]

#: The mask modes: ``"random"`` (:func:`sample_mask`) and ``"structured"`` (:func:`sample_structured_mask`).
MASK_MODES = ("random", "structured")

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64 increment (2**64 / golden ratio, odd)


def _finalise(z: int) -> int:
    """The splitmix64 output function (Stafford's "Mix13") on a 64-bit integer."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix(seed: int, step: int) -> int:
    """Hash ``(seed, step)`` into the 64-bit starting state of the step's stream.

    ``_finalise((seed * 0x9E3779B97F4A7C15 + step + 0x632BE59BD9B4E019) mod 2**64)``.
    Consecutive steps give unrelated streams, and nearby seeds of different runs do not
    share masks at shifted steps (``seed + step`` would).
    """
    return _finalise((seed * _GAMMA + step + 0x632BE59BD9B4E019) & _MASK64)


def _splitmix64(state: int) -> Iterator[int]:
    """The splitmix64 stream: ``state += 0x9E3779B97F4A7C15 (mod 2**64)``, then yield ``_finalise(state)``."""
    while True:
        state = (state + _GAMMA) & _MASK64
        yield _finalise(state)


def _below(stream: Iterator[int], bound: int) -> int:
    """Return an unbiased integer in ``[0, bound)``, ``1 <= bound <= 2**64`` (Lemire 2019).

    Draw ``x``; ``m = x * bound`` (a 128-bit product). If ``m mod 2**64`` is below
    ``threshold = (2**64 - bound) mod bound``, reject and draw again; otherwise return
    ``m >> 64``. The threshold is computed only when ``m mod 2**64 < bound``, which is
    when a rejection is possible; each accepted value is equally likely.
    """
    m = next(stream) * bound
    low = m & _MASK64
    if low < bound:
        threshold = ((1 << 64) - bound) % bound
        while low < threshold:
            m = next(stream) * bound
            low = m & _MASK64
    return m >> 64


def _as_int(value: object, name: str) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def sample_mask(seed: int, step: int, rates: Sequence[float]) -> list[bool]:
    """Draw the drop mask of one training step by systematic sampling.

    The branches are visited in a per-step random order; their rates are laid end to end
    on a line, and the points ``u, u + 1, u + 2, ...`` (one uniform offset ``u``) pick the
    branches to drop. Each branch is dropped with probability equal to its rate (up to
    the ``2**-53`` grid of ``u``), and the number dropped is always ``floor`` or
    ``ceil`` of ``sum(rates)``.

    The algorithm, exactly (all integers; ``n = len(rates)``):

    1. ``state = splitmix64_finalise((seed * 0x9E3779B97F4A7C15 + step +
       0x632BE59BD9B4E019) mod 2**64)``, where ``seed`` is taken modulo ``2**64``
       (two's complement for negative seeds) and ``splitmix64_finalise(z)`` is
       ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB;
       z ^= z >> 31`` with every product taken modulo ``2**64``.
    2. ``next64()`` is splitmix64: ``state = (state + 0x9E3779B97F4A7C15) mod 2**64``;
       return ``splitmix64_finalise(state)``.
    3. ``below(b)`` draws an unbiased integer in ``[0, b)`` by Lemire's method:
       ``m = next64() * b``; while ``m mod 2**64 < (2**64 - b) mod b``, draw
       ``m = next64() * b`` again; return ``m >> 64``.
    4. Fisher-Yates: ``order = [0, 1, ..., n - 1]``; for ``i = n - 1`` down to ``1``:
       ``j = below(i + 1)``, swap ``order[i]`` and ``order[j]``.
    5. ``u = (next64() >> 11) * 2**-53``, uniform on ``[0, 1)``.
    6. Walk ``order`` with ``start = 0``: for branch ``l``, ``end = start + rates[l]``;
       drop ``l`` iff ``floor(end - u) > floor(start - u)`` (a point ``k + u`` lies in
       ``(start, end]``); ``start = end``. This step is computed in exact rational
       arithmetic (every float is a dyadic rational), so the result does not depend on
       floating-point rounding or summation order.

    Args:
        seed: Run seed shared by all ranks (any integer; used modulo ``2**64``).
        step: Zero-based step counter.
        rates: Per-branch drop rates, each in ``[0, 1)``.

    Returns:
        One bool per branch, True where the branch's backward is dropped.

    Raises:
        ValueError: If a rate is NaN or outside ``[0, 1)``, ``step`` is negative, or
            ``seed`` or ``step`` is not an integer.
    """
    rates = check_rates(rates)
    seed = _as_int(seed, "seed")
    step = _as_int(step, "step")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    stream = _splitmix64(_mix(seed & _MASK64, step))
    n = len(rates)
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = _below(stream, i + 1)
        order[i], order[j] = order[j], order[i]
    u_bits = next(stream) >> 11  # u = u_bits / 2**53

    # Exact arithmetic: scale every rate and u to integers over one power-of-two denominator.
    ratios = [r.as_integer_ratio() for r in rates]  # denominators are powers of two
    shift = max([53] + [d.bit_length() - 1 for _, d in ratios])
    scaled = [num << (shift - (den.bit_length() - 1)) for num, den in ratios]
    offset = u_bits << (shift - 53)
    mask = [False] * n
    start = 0
    for index in order:
        end = start + scaled[index]
        # floor((x - offset) / 2**shift) is an arithmetic right shift of an integer.
        if (end - offset) >> shift > (start - offset) >> shift:
            mask[index] = True
        start = end
    return mask


def sample_structured_mask(seed: int, step: int, rates: Sequence[float]) -> list[bool]:
    """Draw a structured drop mask: every branch below a random cut is dropped, none above it.

    With branches in execution order, no dropped branch lies above a kept one, so every kept
    branch gets its exact gradient (a random mask gives a kept branch the gradient of a model
    whose dropped branches above it are missing from the backward). The price: the lower a
    branch, the less often it is trained. The cut is uniform over a range centred on
    ``p * n``, where ``p`` is the mean of ``rates`` (per-branch rates only set that mean), so
    on average a fraction ``p`` of the branches is dropped (within ``1 / (2n)`` at the ends).

    The algorithm, exactly (``n = len(rates)``; steps 1-2 and ``next64`` as in :func:`sample_mask`):

    1. ``state`` from ``(seed, step)``, then ``u = (next64() >> 11) * 2**-53``.
    2. ``p = sum(rates) / n``; ``lo = max(0, 2p - 1)``, ``hi = min(1, 2p)``.
    3. ``k = floor((lo + u * (hi - lo)) * n + 1/2)`` in exact rational arithmetic.
    4. Branch ``i`` is dropped iff ``i < k``.

    Args:
        seed: Run seed shared by all ranks (any integer; used modulo ``2**64``).
        step: Zero-based step counter.
        rates: Per-branch drop rates, each in ``[0, 1)``; only their mean matters.

    Returns:
        One bool per branch, True where the branch's backward is dropped.

    Raises:
        ValueError: As :func:`sample_mask`.
    """
    rates = check_rates(rates)
    seed = _as_int(seed, "seed")
    step = _as_int(step, "step")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    n = len(rates)
    if n == 0:
        return []
    stream = _splitmix64(_mix(seed & _MASK64, step))
    u = Fraction(next(stream) >> 11, 1 << 53)
    p = sum(map(Fraction, rates)) / n
    lo, hi = max(Fraction(0), 2 * p - 1), min(Fraction(1), 2 * p)
    cut = int((lo + u * (hi - lo)) * n + Fraction(1, 2))  # floor: the value is >= 0
    return [i < cut for i in range(n)]
