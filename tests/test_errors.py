"""One exception type for refusals, catchable as the ValueError or RuntimeError each refusal used to be."""

import pytest
import torch
from conftest import tiny_llama

import dropbp
from dropbp.errors import COMPILE_REFUSED, DropBPError


def test_a_refusal_is_a_dropbp_error_and_both_of_its_old_types():
    with pytest.raises(DropBPError) as caught:
        dropbp.apply(torch.compile(tiny_llama(), backend="eager"))
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, RuntimeError)
    assert str(caught.value) == f"DropBP: {COMPILE_REFUSED}"
    assert "\n" not in str(caught.value)
