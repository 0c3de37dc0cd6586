"""dropbp.zero without DeepSpeed: what the explicit guard accepts (the engine tests are in tests/integrations)."""

import pytest
from conftest import tiny_llama

import dropbp


def test_guard_refuses_what_is_not_a_deepspeed_engine():
    with pytest.raises(ValueError, match="needs the engine deepspeed.initialize returned, got LlamaForCausalLM"):
        dropbp.zero.guard(tiny_llama())
    with pytest.raises(ValueError, match="got object"):
        dropbp.zero.guard(object())
