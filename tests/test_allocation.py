import math

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


@settings(max_examples=150, deadline=None)
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


def test_extremes():
    assert allocate_drop_rates([1.0, 2.0], [1.0, 1.0], 0.0) == [0.0, 0.0]
    assert allocate_drop_rates([1.0, 2.0], [1.0, 1.0], 0.9) == [0.9, 0.9]
    assert allocate_drop_rates([1.0, 2.0], [0.0, 0.0], 0.5) == [0.0, 0.0]


def test_greedy_is_close_but_not_better():
    sens = [3.0, 0.5, 1.0, 8.0, 0.2, 2.0]
    flops = [4.0, 8.0, 4.0, 8.0, 4.0, 8.0]
    exact = allocate_drop_rates(sens, flops, 0.5)
    greedy = allocate_drop_rates(sens, flops, 0.5, method="greedy")
    assert all(abs(round(p / 0.1) * 0.1 - p) < 1e-9 for p in greedy)
    assert flops_weighted_rate(greedy, flops) >= 0.5 - 1e-9
    assert allocation_objective(sens, exact) <= allocation_objective(sens, greedy)


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
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        allocate_drop_rates(**kwargs)
