"""Masks: golden values (a cross-version promise), a differential check and statistics.

The golden values below were computed once from ``dropbp.masks`` and are checked here
against ``reference_mask``, an independent re-implementation of the documented algorithm
written with different arithmetic (``%``/``divmod`` instead of masks and shifts, a
retry-loop Lemire without the fast path, and ``fractions.Fraction`` for the systematic
sampling instead of scaled integers). The raw splitmix64 stream is also pinned to the
published reference vector (Rosetta Code, "Pseudo-random numbers/Splitmix64", seed 1234567).
"""

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2

from dropbp.masks import _below, _mix, _splitmix64, sample_mask, sample_structured_mask

# ------------------------------------------------------------ independent reference
TWO64 = 2**64
GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def ref_finalise(value):
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 % TWO64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB % TWO64
    return value ^ (value >> 31)


class RefSplitMix64:
    def __init__(self, state):
        self.state = state % TWO64

    def next64(self):
        self.state = (self.state + GOLDEN_GAMMA) % TWO64
        return ref_finalise(self.state)

    def below(self, bound):
        # Lemire's method as a plain retry loop: accept when the low word clears the threshold.
        threshold = (TWO64 - bound) % bound
        while True:
            high, low = divmod(self.next64() * bound, TWO64)
            if low >= threshold:
                return high


def ref_state(seed, step):
    return ref_finalise(((seed % TWO64) * GOLDEN_GAMMA + step + 0x632BE59BD9B4E019) % TWO64)


def reference_mask(seed, step, rates):
    rng = RefSplitMix64(ref_state(seed, step))
    order = list(range(len(rates)))
    i = len(rates) - 1
    while i >= 1:
        j = rng.below(i + 1)
        order[i], order[j] = order[j], order[i]
        i -= 1
    u = Fraction(rng.next64() // 2**11, 2**53)
    dropped = set()
    position = Fraction(0)
    for index in order:
        nxt = position + Fraction(rates[index])
        if math.floor(nxt - u) > math.floor(position - u):
            dropped.add(index)
        position = nxt
    return [index in dropped for index in range(len(rates))]


def bits(mask):
    return "".join("1" if dropped else "0" for dropped in mask)


# ------------------------------------------------------------ golden values
RATES24 = [
    0.0, 0.9, 0.1, 0.5, 0.33, 0.75, 0.2, 0.6, 0.05, 0.45, 0.8, 0.3,
    0.0, 0.65, 0.15, 0.55, 0.25, 0.85, 0.4, 0.7, 0.35, 0.95, 0.12, 0.5,
]  # fmt: skip

GOLDEN_MASKS = [
    (0, 0, [0.5] * 10, "0101101010"),
    (2**63 + 5, 0, RATES24, "010101001011011000110100"),
    (7, 10**9, RATES24, "010001010010001101011101"),
    (2**63 + 5, 10**9, RATES24, "000000010011011100110101"),
    (123, 1, [0.1, 0.9, 0.0, 0.5], "0101"),
    (1, 2, [0.1] * 10, "1000000000"),
    (42, 3, [1e-300, 0.999999, 0.5, 5e-324], "0110"),
    (0, 0, [0.3], "0"),
    (3, 17, [0.25] * 8, "00001001"),
]

# (seed, step) -> starting state and the first four words of the step's stream.
GOLDEN_STREAMS = [
    (0, 0, 0x6DB6CA64564DAEAA, [0xF5DD724FF3B8A536, 0x7C6EDE0099D1DAC1, 0x09F2C7599678A38E, 0x7F0826B1A0A9165D]),
    (2**63 + 5, 0, 0x41393135F22F16DB, [0x3ADBD0FF1231ED15, 0xBCCE594E5124E14F, 0x7E5E5002805D21A9, 0xFC4C4DF5DBD7F761]),
    (7, 10**9, 0x08629B70BA272FB1, [0x3A52831607458DC2, 0x42EEACEB06979003, 0x650D941CBE7E0A12, 0xC95335A0E25BECDA]),
]


@pytest.mark.parametrize("seed, step, rates, expected", GOLDEN_MASKS)
def test_golden_masks(seed, step, rates, expected):
    assert bits(sample_mask(seed, step, rates)) == expected
    assert bits(reference_mask(seed, step, rates)) == expected


@pytest.mark.parametrize("seed, step, state, words", GOLDEN_STREAMS)
def test_golden_generator_words(seed, step, state, words):
    assert _mix(seed, step) == ref_state(seed, step) == state
    ours = _splitmix64(state)
    ref = RefSplitMix64(state)
    for word in words:
        assert next(ours) == ref.next64() == word


def test_splitmix64_matches_the_published_reference_vector():
    stream = _splitmix64(1234567)
    assert [next(stream) for _ in range(5)] == [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
        4593380528125082431,
        16408922859458223821,
    ]
    assert next(_splitmix64(0)) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("bound", [1, 2, 3, 24, 2**32 + 1, 2**63 + 1, 3 * 2**62, 2**64 - 1, 2**64])
def test_bounded_draws_match_reference_including_rejections(bound):
    # Bounds near 2**64 reject about half of the words, so the retry path is exercised.
    ours, ref = _splitmix64(99), RefSplitMix64(99)
    draws = [_below(ours, bound) for _ in range(200)]
    assert draws == [ref.below(bound) for _ in range(200)]
    assert all(0 <= d < bound for d in draws)
    assert next(ours) == ref.next64()  # both consumed the same number of words


rate_lists = st.lists(
    st.one_of(
        st.floats(0.0, 1.0, exclude_max=True),
        st.sampled_from([0.0, 0.1, 0.5, 5e-324, 1e-300, math.nextafter(1.0, 0.0)]),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(st.integers(-(2**70), 2**70), st.integers(0, 2**66), rate_lists)
def test_matches_independent_reference(seed, step, rates):
    assert sample_mask(seed, step, rates) == reference_mask(seed, step, rates)


def test_seed_is_taken_modulo_two_to_the_64():
    assert sample_mask(-1, 5, RATES24) == sample_mask(2**64 - 1, 5, RATES24)
    assert sample_mask(2**64 + 3, 5, RATES24) == sample_mask(3, 5, RATES24)


def test_integer_like_seed_and_step_are_accepted():
    np = pytest.importorskip("numpy")
    assert sample_mask(np.int64(7), np.uint32(10), RATES24) == sample_mask(7, 10, RATES24)


# ------------------------------------------------------------ streams are distinct
def test_step_streams_do_not_collide():
    first_words = {next(_splitmix64(_mix(seed, step))) for seed in range(50) for step in range(200)}
    assert len(first_words) == 50 * 200


def test_different_seeds_and_steps_give_different_masks():
    rates = [0.5] * 24  # C(24, 12) ~ 2.7e6 equally likely masks
    by_step = [tuple(sample_mask(0, step, rates)) for step in range(300)]
    assert len(set(by_step)) >= 298
    other_seed = [tuple(sample_mask(1, step, rates)) for step in range(300)]
    assert sum(a == b for a, b in zip(by_step, other_seed)) <= 1


def test_consecutive_seeds_do_not_share_masks_at_shifted_steps():
    # Seeding with seed + step (or any hash of it) would make seed s + 1 at step t repeat
    # seed s at step t + 1.
    rates = [0.5] * 24
    for seed in range(3):
        a = [tuple(sample_mask(seed, step, rates)) for step in range(120)]
        b = [tuple(sample_mask(seed + 1, step, rates)) for step in range(120)]
        for shift in range(-20, 21):
            matches = sum(a[t] == b[t + shift] for t in range(max(0, -shift), min(120, 120 - shift)))
            assert matches <= 1, (seed, shift)


# ------------------------------------------------------------ statistics
@pytest.mark.parametrize(
    "rates",
    [[0.5] * 10, [0.05, 0.9, 0.33, 0.6, 0.0, 0.25, 0.77], [0.875] * 8, [0.1] * 10, RATES24],
)
def test_count_per_step_is_floor_or_ceil(rates):
    total = sum(Fraction(r) for r in rates)  # exact sum of the rates as given
    allowed = {math.floor(total), math.ceil(total)}
    counts = {sum(sample_mask(3, step, rates)) for step in range(1500)}
    assert counts <= allowed
    if 0.05 < total - math.floor(total) < 0.95:
        assert counts == allowed  # both occur, not always the same one


@pytest.mark.parametrize("seed", [11, 2**63 + 5])
def test_long_run_marginals_are_unbiased(seed):
    rates = [0.05, 0.9, 0.33, 0.6, 0.0, 0.25, 0.77, 0.5, 0.999, 0.001]
    steps = 20000
    counts = [0] * len(rates)
    for step in range(steps):
        for i, dropped in enumerate(sample_mask(seed, step, rates)):
            counts[i] += dropped
    for rate, count in zip(rates, counts):
        # Drops of one branch are independent Bernoulli(rate) draws across steps; 5 binomial
        # standard errors, plus a count of 1 for rates whose expected count is tiny.
        sigma = math.sqrt(steps * rate * (1 - rate))
        assert abs(count - steps * rate) <= 5 * sigma + 1, (rate, count)
    assert counts[4] == 0


def test_shuffle_is_uniform_over_pairs():
    # With four rates of 0.5 the dropped pair is {order[0], order[2]} or {order[1], order[3]}:
    # each of the 6 pairs has probability 1/6 exactly when the permutation is uniform.
    steps = 6000
    pairs = list(itertools.combinations(range(4), 2))
    observed = dict.fromkeys(pairs, 0)
    for step in range(steps):
        mask = sample_mask(5, step, [0.5] * 4)
        observed[tuple(i for i in range(4) if mask[i])] += 1
    expected = steps / len(pairs)
    statistic = sum((count - expected) ** 2 / expected for count in observed.values())
    assert statistic < chi2.ppf(1 - 1e-6, df=len(pairs) - 1)


def test_zero_rates_never_drop_and_empty_is_empty():
    assert not any(any(sample_mask(0, s, [0.0] * 5)) for s in range(100))
    assert sample_mask(0, 0, []) == []


def test_bad_inputs():
    with pytest.raises(ValueError, match="step must be >= 0"):
        sample_mask(0, -1, [0.5])
    with pytest.raises(ValueError, match="step must be an integer"):
        sample_mask(0, 1.5, [0.5])
    with pytest.raises(ValueError, match="seed must be an integer"):
        sample_mask("0", 0, [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sample_mask(0, 0, [0.5, 1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sample_mask(0, 0, [float("nan")])


# ------------------------------------------------------------ structured masks
def reference_structured_mask(seed, step, rates):
    """The documented algorithm in integers: ``k = floor(f n + 1/2)`` as ``(2 f n + 1) // 2`` over one denominator."""
    n = len(rates)
    if not n:
        return []
    u_num = RefSplitMix64(ref_state(seed, step)).next64() // 2**11  # u = u_num / 2**53
    total = sum(Fraction(r) for r in rates)  # p = total / n
    den = total.denominator
    two_p = 2 * total.numerator  # 2p = two_p / (den * n)
    scale = den * n
    lo = max(0, two_p - scale)  # over scale
    hi = min(scale, two_p)
    f_num = lo * 2**53 + u_num * (hi - lo)  # f = f_num / (scale * 2**53)
    cut = (2 * f_num * n + scale * 2**53) // (2 * scale * 2**53)
    return [i < cut for i in range(n)]


GOLDEN_STRUCTURED = [
    (0, 0, [0.5] * 12, "111111111111"),
    (0, 1, [0.5] * 12, "111110000000"),
    (1, 0, [0.5] * 12, "111111000000"),
    (7, 123, [0.25] * 20, "11111110000000000000"),
    (7, 124, [0.75] * 20, "11111111111000000000"),
    (2**64 - 1, 5, RATES24, "111110000000000000000000"),
    (-3, 9, [0.9] * 10, "1111111111"),
    (12345, 99999, [0.1] * 16, "1100000000000000"),
]


@pytest.mark.parametrize("seed, step, rates, expected", GOLDEN_STRUCTURED)
def test_golden_structured_masks(seed, step, rates, expected):
    assert bits(sample_structured_mask(seed, step, rates)) == expected
    assert bits(reference_structured_mask(seed, step, rates)) == expected


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(-(2**70), 2**70),
    step=st.integers(0, 2**40),
    rates=st.lists(st.floats(0.0, 0.999, allow_nan=False), min_size=0, max_size=40),
)
def test_structured_matches_independent_reference(seed, step, rates):
    assert sample_structured_mask(seed, step, rates) == reference_structured_mask(seed, step, rates)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9])
def test_structured_masks_drop_a_lowest_prefix_at_the_mean_rate(rate):
    n, steps = 24, 6000
    masks = [sample_structured_mask(5, t, [rate] * n) for t in range(steps)]
    for mask in masks:  # no dropped branch lies above a kept one
        assert mask == sorted(mask, reverse=True)
    fraction = sum(map(sum, masks)) / (n * steps)
    assert abs(fraction - rate) < 0.01 + 1 / (2 * n)
    if rate == 0.0:
        assert fraction == 0.0
    # Per-branch rates only set the mean: the same mean gives the same masks.
    skewed = [2 * rate if i % 2 else 0.0 for i in range(n)] if rate < 0.5 else [rate] * n
    assert all(sample_structured_mask(5, t, skewed) == masks[t] for t in range(50))


def test_structured_masks_validate_like_random_ones():
    assert sample_structured_mask(0, 0, []) == []
    for bad, message in [((0, -1, [0.5]), "step must be >= 0"), ((0.5, 0, [0.5]), "seed must be an integer"),
                         ((0, 0, [1.0]), r"\[0, 1\)")]:
        with pytest.raises(ValueError, match=message):
            sample_structured_mask(*bad)
