import math

import pytest

from dropbp.masks import sample_mask


def test_same_inputs_same_mask():
    rates = [0.1, 0.5, 0.7, 0.3, 0.9]
    for step in range(50):
        assert sample_mask(7, step, rates) == sample_mask(7, step, rates)


def test_steps_and_seeds_differ():
    rates = [0.5] * 16
    masks = {tuple(sample_mask(0, s, rates)) for s in range(50)}
    assert len(masks) > 40
    assert [sample_mask(0, s, rates) for s in range(20)] != [sample_mask(1, s, rates) for s in range(20)]


@pytest.mark.parametrize("rates", [[0.5] * 10, [0.05, 0.9, 0.33, 0.6, 0.0, 0.25, 0.77], [0.875] * 8])
def test_count_per_step_is_floor_or_ceil(rates):
    total = sum(rates)
    for step in range(2000):
        count = sum(sample_mask(3, step, rates))
        assert count in (math.floor(total), math.ceil(total))


def test_long_run_marginals_are_unbiased():
    rates = [0.05, 0.9, 0.33, 0.6, 0.0, 0.25, 0.77, 0.5]
    steps = 20000
    counts = [0] * len(rates)
    for step in range(steps):
        for i, dropped in enumerate(sample_mask(11, step, rates)):
            counts[i] += dropped
    for rate, count in zip(rates, counts):
        # 5 standard errors of a Bernoulli mean: a false failure is practically impossible.
        tolerance = 5 * math.sqrt(max(rate * (1 - rate), 1e-12) / steps)
        assert abs(count / steps - rate) <= tolerance + 1e-12


def test_zero_rates_never_drop():
    assert not any(any(sample_mask(0, s, [0.0] * 5)) for s in range(100))


def test_bad_inputs():
    with pytest.raises(ValueError, match="step"):
        sample_mask(0, -1, [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sample_mask(0, 0, [0.5, 1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sample_mask(0, 0, [float("nan")])
