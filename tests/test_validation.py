import math

import numpy as np
import pytest
import torch

from dropbp.validation import check_int, check_mask, check_nonnegative, check_rate, check_rates


# ------------------------------------------------------------ check_rate
@pytest.mark.parametrize("rate", [0, 0.0, 0.5, math.nextafter(1.0, 0.0), "0.25", np.float32(0.5), torch.tensor(0.5)])
def test_check_rate_accepts_numbers_in_unit_interval(rate):
    value = check_rate(rate)
    assert isinstance(value, float) and value == float(rate)


@pytest.mark.parametrize("rate", [1.0, 1, -0.1, -1e-300, 2.0, float("inf"), float("-inf"), float("nan")])
def test_check_rate_refuses_out_of_range(rate):
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\) \(1 would never train the branch\)"):
        check_rate(rate)


@pytest.mark.parametrize("rate", [None, "half", [0.5], object()])
def test_check_rate_refuses_non_numbers(rate):
    with pytest.raises(ValueError, match=r"drop_rate must be a number in \[0, 1\), got "):
        check_rate(rate)


def test_check_rate_names_the_argument_and_value():
    with pytest.raises(ValueError, match=r"^my_rate must be in \[0, 1\).*got 1\.5$"):
        check_rate(1.5, name="my_rate")
    with pytest.raises(ValueError, match=r"^x must be a number .* got 'abc'$"):
        check_rate("abc", name="x")


# ------------------------------------------------------------ check_int
@pytest.mark.parametrize("value", [0, 7, -3, 2**70, np.int64(5), np.int32(-2), np.uint8(3), torch.tensor(4)])
def test_check_int_accepts_integers_as_plain_ints(value):
    out = check_int(value, "seed")
    assert type(out) is int and out == int(value)


@pytest.mark.parametrize(
    "value, shown",
    [(1.5, r"1\.5"), (2.0, r"2\.0"), (np.float64(3.0), r"np\.float64\(3\.0\)"), ("1", "'1'"), (None, "None"),
     (float("nan"), "nan"), (torch.tensor(2.0), r"tensor\(2\.\)"), ([1], r"\[1\]")],
)
def test_check_int_refuses_non_integers(value, shown):
    with pytest.raises(ValueError, match=rf"^seed must be an integer, got {shown}$"):
        check_int(value, "seed")


@pytest.mark.parametrize("value", [True, False, np.bool_(True), torch.tensor(True)])
def test_check_int_refuses_bools(value):
    with pytest.raises(ValueError, match=r"^n must be an integer >= 0 \(not a bool\), got "):
        check_int(value, "n", minimum=0)


def test_check_int_minimum():
    assert check_int(1, "sensitivity_batches", minimum=1) == 1
    with pytest.raises(ValueError, match=r"^sensitivity_batches must be an integer >= 1, got 0$"):
        check_int(0, "sensitivity_batches", minimum=1)
    with pytest.raises(ValueError, match=r"^sensitivity_batches must be an integer >= 1, got 2\.5$"):
        check_int(2.5, "sensitivity_batches", minimum=1)
    assert check_int(-(2**70), "seed") == -(2**70)


# ------------------------------------------------------------ check_rates
def test_check_rates_returns_floats():
    assert check_rates([0, 0.5, np.float64(0.25)]) == [0.0, 0.5, 0.25]
    assert all(type(v) is float for v in check_rates((0, 0.5)))
    assert check_rates([]) == []
    assert check_rates(torch.tensor([0.5, 0.0])) == [0.5, 0.0]
    assert check_rates(iter([0.1, 0.2]), length=2) == [0.1, 0.2]


def test_check_rates_length():
    assert check_rates([0.1, 0.2], length=2) == [0.1, 0.2]
    with pytest.raises(ValueError, match=r"^expected 3 drop rates \(one per branch\), got 2$"):
        check_rates([0.1, 0.2], length=3)
    with pytest.raises(ValueError, match=r"expected 1 rates for x \(one per branch\), got 0"):
        check_rates([], length=1, name="rates for x")


def test_check_rates_names_the_bad_entry():
    with pytest.raises(ValueError, match=r"^drop rates\[2\] must be in \[0, 1\).*got 1\.0$"):
        check_rates([0.1, 0.2, 1.0])
    with pytest.raises(ValueError, match=r"^drop rates\[0\] must be in \[0, 1\).*got nan$"):
        check_rates([float("nan")])
    with pytest.raises(ValueError, match=r"^r\[1\] must be a number"):
        check_rates([0.1, None], name="r")


@pytest.mark.parametrize("rates", [0.5, None, "0.5"])
def test_check_rates_refuses_non_sequences(rates):
    with pytest.raises(ValueError, match="drop rates must be a sequence of numbers"):
        check_rates(rates)


# ------------------------------------------------------------ check_nonnegative
def test_check_nonnegative_accepts_finite_nonnegative():
    values = [0, 0.0, 5e-324, 1e308, np.float32(2.0), torch.tensor(3.0)]
    out = check_nonnegative(values, "flops")
    assert out == [0.0, 0.0, 5e-324, 1e308, 2.0, 3.0]
    assert all(type(v) is float for v in out)
    assert check_nonnegative([], "flops") == []


@pytest.mark.parametrize(
    "bad, shown",
    [(-1.0, "-1.0"), (-5e-324, "-5e-324"), (float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")],
)
def test_check_nonnegative_refuses_bad_values(bad, shown):
    with pytest.raises(ValueError, match=rf"^sensitivity\[1\] must be finite and >= 0, got {shown}$"):
        check_nonnegative([1.0, bad], "sensitivity")


@pytest.mark.parametrize("bad", [None, "many", [1.0]])
def test_check_nonnegative_refuses_non_numbers(bad):
    with pytest.raises(ValueError, match=r"^flops\[0\] must be a number, got "):
        check_nonnegative([bad], "flops")


@pytest.mark.parametrize("values", [1.0, None, "123"])
def test_check_nonnegative_refuses_non_sequences(values):
    with pytest.raises(ValueError, match="^flops must be a sequence of numbers"):
        check_nonnegative(values, "flops")


# ------------------------------------------------------------ check_mask
def test_check_mask_accepts_bools_and_zero_one():
    assert check_mask([True, False, 1, 0, 1.0, np.bool_(True), np.int64(0)], 7) == [
        True, False, True, False, True, True, False,
    ]  # fmt: skip
    assert all(type(v) is bool for v in check_mask([1, 0], 2))
    assert check_mask(torch.tensor([True, False]), 2) == [True, False]
    assert check_mask([], 0) == []


def test_check_mask_length():
    with pytest.raises(ValueError, match=r"^mask has 2 entries but there are 3 branches$"):
        check_mask([True, False], 3)


@pytest.mark.parametrize("bad", [0.5, 2, -1, "yes", None, float("nan")])
def test_check_mask_refuses_non_bool_entries(bad):
    # A list of drop rates passed as a mask must not silently become "drop everything".
    with pytest.raises(ValueError, match=r"^mask\[1\] must be a bool \(True = dropped\), 0 or 1, got "):
        check_mask([True, bad, False], 3)


@pytest.mark.parametrize("mask", [True, None, "101"])
def test_check_mask_refuses_non_sequences(mask):
    with pytest.raises(ValueError, match="^mask must be a sequence"):
        check_mask(mask, 3)


def test_messages_are_one_line():
    cases = [
        lambda: check_rate(2.0),
        lambda: check_rate("x"),
        lambda: check_rates([0.5], length=2),
        lambda: check_rates("abc"),
        lambda: check_nonnegative([-1.0], "flops"),
        lambda: check_nonnegative(["x"], "flops"),
        lambda: check_mask([0.5], 1),
        lambda: check_mask([True], 2),
        lambda: check_int(1.5, "seed"),
        lambda: check_int(True, "seed"),
        lambda: check_int(0, "n", minimum=1),
    ]
    for case in cases:
        with pytest.raises(ValueError) as info:
            case()
        assert "\n" not in str(info.value) and info.value.__cause__ is None
