import pytest
from conftest import tiny_llama

from dropbp.architectures import BRANCH_PATTERNS, find_model_type, resolve_branches


def test_llama_auto_detection_in_execution_order():
    model = tiny_llama(layers=2)
    assert find_model_type(model) == "llama"
    assert resolve_branches(model) == [
        "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp",
    ]


def test_table_rows_are_pattern_tuples():
    assert {"llama", "mistral", "qwen2", "qwen3"} <= BRANCH_PATTERNS.keys()
    assert all(isinstance(p, tuple) and p for p in BRANCH_PATTERNS.values())


def test_explicit_patterns_override_the_table():
    assert resolve_branches(tiny_llama(layers=2), ["*.layers.1.mlp"]) == ["model.layers.1.mlp"]
    assert resolve_branches(tiny_llama(layers=1), "*.mlp") == ["model.layers.0.mlp"]


def test_nested_patterns_are_refused():
    with pytest.raises(ValueError, match="nested inside branch 'model.layers.0'"):
        resolve_branches(tiny_llama(layers=1), ["model.layers.0", "*.mlp"])
