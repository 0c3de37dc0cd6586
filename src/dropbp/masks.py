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

import contextlib
import operator
import threading
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import Any

from dropbp.schedules import DropSchedule, parse_schedule, scheduled_rates
from dropbp.validation import check_int, check_mask, check_rate, check_rates

__all__ = ["MASK_MODES", "MaskStream", "sample_mask", "sample_structured_mask"]

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


class MaskStream:
    """The mask sequence of one model: seed, step counter, per-branch rates (with their schedule), the mask in force.

    Mask ``t`` is ``sample(seed, t, rates_at(t))`` with the mode's sampler, so the stream is
    resumed exactly from ``(seed, step, rates, schedule)``. The stream is the only owner of
    these values; the handle and the branch table read and set them through it.

    Args:
        count: Branches (the length of every mask and rate list).
        seed: Seed of the stream.
        rate: The initial rate of every branch.
        mode: ``"random"`` (:func:`sample_mask`) or ``"structured"`` (:func:`sample_structured_mask`).
    """

    def __init__(self, count: int, seed: int, rate: float, mode: str = "random"):
        if mode not in MASK_MODES:
            raise ValueError(f"mask must be one of {', '.join(map(repr, MASK_MODES))}, got {mode!r}")
        self.count = count
        self.seed = check_int(seed, "seed")
        self.mode = mode
        self.step = 0
        self.rates = [check_rate(rate)] * count
        #: The rate the per-branch rates realise (their target), which a schedule scales.
        self.target = float(rate)
        self.schedule: DropSchedule | Callable[[int], float] | None = None
        self.total_steps: int | None = None
        self.mask: tuple[bool, ...] = (False,) * count
        self._drop_counts = [0] * count
        self._counted_steps = 0
        self._init_runtime()

    def _init_runtime(self) -> None:
        # per process: a copy or an unpickled stream starts with no forced mask and its own lock
        self._lock = threading.Lock()
        self._forced: list[tuple[bool, ...]] = []

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_forced")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # ------------------------------------------------------------------ drawing
    def advance(self) -> tuple[int, tuple[bool, ...]]:
        """Draw mask ``step``, make it the mask in force and move to the next step.

        Returns:
            The step drawn and its mask.
        """
        with self._lock:  # forwards in several threads each take their own step
            step = self.step
            sampler = sample_structured_mask if self.mode == "structured" else sample_mask
            mask = tuple(sampler(self.seed, step, self.rates_at(step)))
            self.step += 1
            self.mask = mask
            self._counted_steps += 1
            for i, dropped in enumerate(mask):
                self._drop_counts[i] += dropped
        return step, mask

    def current(self) -> tuple[bool, ...]:
        """The mask a training forward uses now: the innermost forced one, else the mask in force."""
        return self._forced[-1] if self._forced else self.mask

    @property
    def is_forced(self) -> bool:
        """Whether a :meth:`forced` block is open."""
        return bool(self._forced)

    @contextlib.contextmanager
    def forced(self, mask: Sequence[bool]) -> Iterator[None]:
        """Within this block, every training forward uses ``mask`` and the stream stays put."""
        self._forced.append(tuple(check_mask(mask, self.count)))
        try:
            yield
        finally:
            self._forced.pop()

    def set_mask(self, mask: Sequence[bool]) -> None:
        """Make ``mask`` the mask in force without moving the step counter."""
        self.mask = tuple(check_mask(mask, self.count))

    def tally(self, reset: bool = True) -> tuple[int, list[int]]:
        """Masks drawn since the last reset, and how often each branch was dropped in them."""
        steps, counts = self._counted_steps, list(self._drop_counts)
        if reset:
            self._drop_counts = [0] * self.count
            self._counted_steps = 0
        return steps, counts

    # ------------------------------------------------------------------ rates
    def set_rates(self, rates: Sequence[float] | float, target: float | None = None) -> list[float]:
        """Set the per-branch rates (one number sets them all) and the target a schedule scales.

        Raises:
            ValueError: On a wrong length, or a rate that is NaN or outside ``[0, 1)``.
        """
        if isinstance(rates, (int, float)):
            rates = [rates] * self.count
        checked = check_rates(rates, self.count)
        self.target = sum(checked) / max(1, len(checked)) if target is None else check_rate(target, "target")
        self.rates = checked
        return list(checked)

    def set_rate(self, index: int, rate: float, name: str) -> None:
        """Set one branch's rate (the target stays)."""
        self.rates[index] = check_rate(rate, f"drop rate of {name}")

    def set_schedule(self, schedule: str | Callable[[int], float] | None, total_steps: int | None = None) -> None:
        """Let the rates follow a schedule of the step (see :meth:`dropbp.DropBPHandle.set_schedule`).

        Raises:
            ValueError: On a bad spec, or a spec that needs ``total_steps`` without it.
        """
        if isinstance(schedule, str):
            schedule = parse_schedule(schedule)
            if schedule.kind == "constant":
                schedule = None
        if schedule is not None and not isinstance(schedule, DropSchedule) and not callable(schedule):
            raise ValueError(f"schedule must be a spec string or a callable step -> rate, got {schedule!r}")
        total = None if total_steps is None else check_int(total_steps, "total_steps", minimum=1)
        if isinstance(schedule, DropSchedule) and total is None:
            raise ValueError(f"the drop schedule {schedule.spec!r} needs total_steps, the mask steps of the run")
        self.schedule, self.total_steps = schedule, total

    @property
    def schedule_spec(self) -> str | None:
        """The schedule as saved in a state dict: its spec, ``"callable"``, or None for constant rates."""
        if self.schedule is None:
            return None
        return self.schedule.spec if isinstance(self.schedule, DropSchedule) else "callable"

    def rates_at(self, step: int) -> list[float]:
        """The per-branch rates in force at ``step`` (the schedule applied)."""
        if self.schedule is None:
            return list(self.rates)
        return scheduled_rates(list(self.rates), self.schedule, step, self.total_steps or 0, self.target)
