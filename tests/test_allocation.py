import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import Bounds, LinearConstraint, minimize

from dropbp import allocate_drop_rates
from dropbp.allocation import allocation_objective, flops_weighted_rate


def reference_solution(sens, flops, target, max_rate):
    """Independent solver: SciPy's trust-region QP on the same programme, rescaled to O(1)."""
    s = np.asarray(sens) / max(max(sens), 1e-300)
    f = np.asarray(flops) / sum(flops)
    result = minimize(
        lambda p: float(s @ (p * p)),
        np.full(len(s), target),
        jac=lambda p: 2 * s * p,
        hess=lambda p: np.diag(2 * s),
        bounds=Bounds(0.0, max_rate),
        constraints=[LinearConstraint(f[None, :], target, target)],
        method="trust-constr",
        options={"gtol": 1e-12, "xtol": 1e-14, "maxiter": 3000},
    )
    assert abs(f @ result.x - target) < 1e-6 and result.x.min() > -1e-6 and result.x.max() < max_rate + 1e-6
    return result.x


problems = st.integers(min_value=1, max_value=12).flatmap(
    lambda n: st.tuples(
        st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 100.0)), min_size=n, max_size=n),
        st.lists(st.floats(1.0, 1000.0), min_size=n, max_size=n),
        # target == max_rate has the single feasible point p = max_rate (test_extremes); SLSQP
        # stalls on that degenerate box, so the solver comparison stays just below it.
        st.floats(0.0, 0.98),
        st.floats(0.3, 0.95),
    )
)


@settings(max_examples=60, deadline=None)
@given(problems)
def test_exact_is_optimal_and_feasible(problem):
    sens, flops, fraction, max_rate = problem
    target = fraction * max_rate
    rates = allocate_drop_rates(sens, flops, target, max_rate=max_rate)
    assert all(0.0 <= p <= max_rate + 1e-12 for p in rates)
    assert math.isclose(flops_weighted_rate(rates, flops), target, rel_tol=1e-9, abs_tol=1e-12)
    ref = reference_solution(sens, flops, target, max_rate)
    ours, theirs = allocation_objective(sens, rates), allocation_objective(sens, ref)
    assert ours <= theirs * (1 + 1e-6) + 1e-9 * max(sens)


def test_kkt_structure():
    sens, flops = [1.0, 2.0, 4.0], [1.0, 1.0, 1.0]
    rates = allocate_drop_rates(sens, flops, 0.3)
    # Unsaturated rates are proportional to F/S.
    assert rates[0] / rates[1] == pytest.approx(2.0)
    assert rates[1] / rates[2] == pytest.approx(2.0)


def test_free_branches_first():
    rates = allocate_drop_rates([0.0, 5.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], 0.3, max_rate=0.9)
    assert rates == [0.6, 0.0, 0.6, 0.0]
    rates = allocate_drop_rates([0.0, 5.0, 1.0], [1.0, 1.0, 1.0], 0.5, max_rate=0.9)
    assert rates[0] == 0.9
    assert flops_weighted_rate(rates, [1, 1, 1]) == pytest.approx(0.5)


def test_zero_flops_and_ties_are_deterministic():
    sens, flops = [1.0, 1.0, 3.0, 2.0], [0.0, 10.0, 10.0, 0.0]
    first = allocate_drop_rates(sens, flops, 0.4)
    assert first[0] == 0.0 and first[3] == 0.0
    assert all(allocate_drop_rates(sens, flops, 0.4) == first for _ in range(5))
    assert allocate_drop_rates([2.0] * 4, [3.0] * 4, 0.5) == [0.5] * 4


@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_extremes(method):
    assert allocate_drop_rates([1.0, 2.0], [1.0, 1.0], 0.0, method=method) == [0.0, 0.0]
    assert allocate_drop_rates([1.0, 2.0], [1.0, 1.0], 0.9, method=method) == [0.9, 0.9]
    assert allocate_drop_rates([1.0, 2.0], [0.0, 0.0], 0.0, method=method) == [0.0, 0.0]
    assert allocate_drop_rates([], [], 0.0, method=method) == []


def test_greedy_is_close_but_not_better():
    sens = [3.0, 0.5, 1.0, 8.0, 0.2, 2.0]
    flops = [4.0, 8.0, 4.0, 8.0, 4.0, 8.0]
    exact = allocate_drop_rates(sens, flops, 0.5)
    greedy = allocate_drop_rates(sens, flops, 0.5, method="greedy")
    # The paper's 0.1 grid, except (at most) the last step, which stops at the target.
    assert sum(abs(round(p / 0.1) * 0.1 - p) > 1e-9 for p in greedy) <= 1
    assert_meets_target(greedy, flops, 0.5)
    assert allocation_objective(sens, exact) <= allocation_objective(sens, greedy)


# ------------------------------------------------------------ exact checks (rational arithmetic)
def dropped_fraction_error(rates, flops, target):
    """|sum F p - target sum F| / (target sum F), computed exactly."""
    F = [Fraction(f) for f in flops]
    budget = Fraction(target) * sum(F)
    achieved = sum((f * Fraction(p) for f, p in zip(F, rates)), Fraction(0))
    if budget == 0:
        return 0.0 if achieved == 0 else math.inf
    return float(abs(achieved - budget) / budget)


def assert_meets_target(rates, flops, target, max_rate=0.9):
    assert len(rates) == len(flops)
    assert all(isinstance(p, float) and 0.0 <= p <= max_rate for p in rates), rates
    assert dropped_fraction_error(rates, flops, target) <= 1e-12, rates


def exact_objective(sens, rates):
    return sum((Fraction(s) * Fraction(p) ** 2 for s, p in zip(sens, rates)), Fraction(0))


# ------------------------------------------------------------ reproduced defects
def test_greedy_fills_to_the_target_at_max_rate():
    # Was [0.9, 0.9] (0.1 steps cannot reach 0.95), silently under the target.
    assert allocate_drop_rates([1.0, 2.0], [1.0, 1.0], 0.95, max_rate=0.95, method="greedy") == [0.95, 0.95]
    rates = allocate_drop_rates([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 0.93, max_rate=0.95, method="greedy")
    assert_meets_target(rates, [1.0, 2.0, 3.0], 0.93, max_rate=0.95)


def test_greedy_does_not_overshoot():
    # The last step used to be a whole 0.1 step past the target.
    rates = allocate_drop_rates([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], 0.05, method="greedy")
    assert rates == [0.1, 0.05, 0.0]
    assert_meets_target(rates, [1.0, 1.0, 1.0], 0.05)


@pytest.mark.parametrize(
    "sens, flops",
    [
        ([1e-300, 1.0], [1.0, 1.0]),
        ([1e-300, 1.0], [1e300, 1e300]),  # was [0.9, 0.0]: target missed
        ([1e-310, 1.0], [1.0, 1.0]),  # denormal: was [0.9, 0.0]
        ([5e-324, 1.0], [1.0, 1.0]),  # the smallest float: was [0.9, 0.0]
        ([1.0, 1e-300], [1e-300, 1.0]),
        ([1e-300, 1e300], [1e300, 1e-300]),
    ],
)
@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_tiny_sensitivities_still_meet_the_target(sens, flops, method):
    rates = allocate_drop_rates(sens, flops, 0.5, method=method)
    assert_meets_target(rates, flops, 0.5)


def test_tiny_sensitivity_is_nearly_free():
    # A sensitivity 1e-300 times smaller than the other is filled first, up to max_rate.
    assert allocate_drop_rates([1e-300, 1.0], [1e300, 1e300], 0.5) == [0.9, 0.09999999999999998]


@pytest.mark.parametrize("scale", [1e-200, 1e-300, 5e-324, 1e300, 1e308])
@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_flops_at_any_scale(scale, method):
    # FLOPs of 1e-200 used to raise ZeroDivisionError; 1e308 would overflow a float sum.
    rates = allocate_drop_rates([1.0, 1.0], [scale, scale], 0.5, method=method)
    assert rates == [0.5, 0.5]
    sens, flops = [3.0, 0.5, 1.0], [scale, 2 * scale if scale < 1e308 else scale, scale]
    rates = allocate_drop_rates(sens, flops, 0.4, method=method)
    assert_meets_target(rates, flops, 0.4)
    unscaled = allocate_drop_rates(sens, [f / scale for f in flops], 0.4, method=method)
    assert rates == pytest.approx(unscaled, rel=1e-12, abs=1e-15)


def test_sensitivity_scale_does_not_matter():
    sens, flops = [3.0, 0.5, 1.0, 8.0], [4.0, 8.0, 4.0, 8.0]
    base = allocate_drop_rates(sens, flops, 0.5)
    for scale in [5e-324 * 2**20, 1e-300, 1e300]:
        assert allocate_drop_rates([s * scale for s in sens], flops, 0.5) == pytest.approx(base, rel=1e-12)


def test_all_flops_zero_with_a_positive_target_is_refused():
    with pytest.raises(ValueError, match="all 2 branch FLOPs are zero") as info:
        allocate_drop_rates([1.0, 2.0], [0.0, 0.0], 0.5)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="FLOPs are zero"):
        allocate_drop_rates([], [], 0.5, method="greedy")


# ------------------------------------------------------------ property test, extreme values
extreme = st.one_of(
    st.just(0.0),
    st.sampled_from([5e-324, 1e-310, 1e-300, 1.0, 1e300, 1e308]),
    st.floats(-300.0, 300.0).map(lambda e: 10.0**e),
    st.floats(0.0, 10.0),
)
extreme_problems = st.integers(min_value=1, max_value=10).flatmap(
    lambda n: st.tuples(
        st.lists(extreme, min_size=n, max_size=n),
        st.lists(extreme, min_size=n, max_size=n),
        st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 1e-300])),
        st.one_of(st.floats(0.05, 0.99), st.sampled_from([0.9, 0.95])),
    )
)


@settings(max_examples=200, deadline=None)
@given(extreme_problems)
def test_every_allocation_meets_the_target_or_says_why(problem):
    sens, flops, fraction, max_rate = problem
    target = min(fraction * max_rate, max_rate)
    if target > 0 and not any(f > 0 for f in flops):
        for method in ("exact", "greedy"):
            with pytest.raises(ValueError, match="FLOPs are zero"):
                allocate_drop_rates(sens, flops, target, max_rate=max_rate, method=method)
        return
    exact = allocate_drop_rates(sens, flops, target, max_rate=max_rate)
    greedy = allocate_drop_rates(sens, flops, target, max_rate=max_rate, method="greedy")
    for rates in (exact, greedy):
        assert_meets_target(rates, flops, target, max_rate)
    uniform = [target] * len(sens)
    best = exact_objective(sens, exact)
    # Exact is optimal: no worse than the greedy or the uniform allocation (up to the
    # rounding of its rates to floats).
    assert best <= exact_objective(sens, greedy) * (1 + Fraction(1, 10**12))
    assert best <= exact_objective(sens, uniform) * (1 + Fraction(1, 10**12))
    # The float helpers agree with the exact check, without overflow or underflow.
    if target > 0:
        assert math.isclose(flops_weighted_rate(exact, flops), target, rel_tol=1e-9)


def test_greedy_step_larger_than_max_rate_stops_at_max_rate():
    rates = allocate_drop_rates([1.0, 2.0], [1.0, 1.0], 0.05, max_rate=0.06, method="greedy")
    assert rates == [0.06, pytest.approx(0.04, rel=1e-15)]
    assert_meets_target(rates, [1.0, 1.0], 0.05, max_rate=0.06)


def test_helpers_handle_extreme_values():
    assert flops_weighted_rate([0.5, 0.5], [1e308, 1e308]) == 0.5
    assert flops_weighted_rate([0.5, 0.25], [5e-324, 5e-324]) == 0.375
    assert flops_weighted_rate([0.5, 0.25], [0.0, 0.0]) == 0.0
    assert flops_weighted_rate([], []) == 0.0
    assert allocation_objective([2.0, 1e300], [0.5, 0.0]) == 0.5
    assert allocation_objective([], []) == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sensitivity": [1.0, -1.0], "flops": [1.0, 1.0], "target": 0.5}, r"sensitivity\[1\]"),
        ({"sensitivity": [1.0, float("nan")], "flops": [1.0, 1.0], "target": 0.5}, r"sensitivity\[1\]"),
        ({"sensitivity": [1.0, 1.0], "flops": [1.0, -2.0], "target": 0.5}, r"flops\[1\]"),
        ({"sensitivity": [1.0, 1.0], "flops": [float("nan"), 1.0], "target": 0.5}, r"flops\[0\]"),
        ({"sensitivity": [1.0], "flops": [1.0, 1.0], "target": 0.5}, "1 entries but flops has 2"),
        ({"sensitivity": [1.0], "flops": [1.0], "target": 0.95}, "target must be in"),
        ({"sensitivity": [1.0], "flops": [1.0], "target": -0.1}, "target must be in"),
        ({"sensitivity": [1.0], "flops": [1.0], "target": float("nan")}, "target must be in"),
        ({"sensitivity": [1.0], "flops": [1.0], "target": 0.5, "max_rate": 1.0}, "max_rate"),
        ({"sensitivity": [1.0], "flops": [1.0], "target": 0.5, "method": "magic"}, "method"),
        ({"sensitivity": [float("inf")], "flops": [1.0], "target": 0.5}, r"sensitivity\[0\] must be finite"),
        ({"sensitivity": [1.0], "flops": [float("inf")], "target": 0.5}, r"flops\[0\] must be finite"),
        ({"sensitivity": ["x"], "flops": [1.0], "target": 0.5}, r"sensitivity\[0\] must be a number"),
        ({"sensitivity": [1.0], "flops": [1.0], "target": "half"}, "target must be a number"),
        ({"sensitivity": [1.0], "flops": [1.0], "target": 0.5, "max_rate": 0.0}, "max_rate"),
        ({"sensitivity": [1.0], "flops": [1.0], "target": 0.5, "max_rate": float("nan")}, "max_rate"),
        ({"sensitivity": [1.0], "flops": [1.0], "target": 0.5, "method": "greedy", "greedy_step": 0.0}, "greedy_step"),
        ({"sensitivity": [1.0], "flops": [1.0], "target": 0.5, "method": "greedy", "greedy_step": 1.5}, "greedy_step"),
        (
            {"sensitivity": [1.0], "flops": [1.0], "target": 0.5, "method": "greedy", "greedy_step": float("nan")},
            "greedy_step",
        ),
        ({"sensitivity": [1.0], "flops": [1.0], "target": 0.5, "method": "greedy", "greedy_step": 1e-6}, "method='exact'"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        allocate_drop_rates(**kwargs)
