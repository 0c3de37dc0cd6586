"""Tiny random-weight causal LMs built from default configs (dropbp.tiny)."""

import math
import subprocess
import sys

import pytest
import torch
import transformers as T

from dropbp.tiny import causal_lm_types, example_batch, shrink_config, tiny_causal_lm

# Representative types: dense GQA, MoE (routed; routed + shared), GPT-2 naming (n_embd...),
# per-layer attention types, MLA (DeepSeek), and two hybrids (Mamba + attention + MoE;
# linear attention + full attention).
REPRESENTATIVE = ["llama", "mixtral", "qwen2_moe", "gpt2", "gemma3_text", "deepseek_v3", "jamba", "qwen3_next"]


def _stored(config, name):
    """What a config stores for ``name``, through its attribute_map (n_embd for hidden_size...)."""
    return vars(config)[type(config).attribute_map.get(name, name)]


@pytest.mark.parametrize("model_type", REPRESENTATIVE)
def test_shrink_config_copies_and_shrinks(model_type):
    original = T.AutoConfig.for_model(model_type)
    before = original.to_dict()

    tiny = shrink_config(original)

    assert original.to_dict() == before, "the original config was modified"
    assert tiny is not original
    assert _stored(tiny, "hidden_size") == 64
    assert _stored(tiny, "num_hidden_layers") == 2
    assert _stored(tiny, "num_attention_heads") == 4
    assert _stored(tiny, "vocab_size") == 256
    assert tiny.use_cache is False
    for name, value in vars(tiny).items():
        if "dropout" in name and isinstance(value, float):
            assert value == 0.0, name
        if name.endswith("_token_id") and isinstance(value, int):
            assert 0 <= value < 256, name


def test_grouped_kv_heads_stay_grouped_and_mha_stays_mha():
    mixtral = shrink_config(T.AutoConfig.for_model("mixtral"))  # 32 query heads, 8 KV heads
    assert (mixtral.num_attention_heads, mixtral.num_key_value_heads) == (4, 2)
    mha = shrink_config(T.LlamaConfig(num_attention_heads=32, num_key_value_heads=32))
    assert mha.num_key_value_heads == 4
    mqa = shrink_config(T.LlamaConfig(num_attention_heads=32, num_key_value_heads=1))
    assert mqa.num_key_value_heads == 1


def test_sizes_of_moe_configs():
    mixtral = shrink_config(T.AutoConfig.for_model("mixtral"))
    assert (mixtral.intermediate_size, mixtral.num_local_experts, mixtral.num_experts_per_tok) == (128, 4, 2)
    qwen = shrink_config(T.AutoConfig.for_model("qwen2_moe"))
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size) == (4, 2, 32)
    assert qwen.shared_expert_intermediate_size == 32


def test_explicit_head_dim_becomes_16():
    gemma = shrink_config(T.AutoConfig.for_model("gemma3_text"))  # sets head_dim=256 explicitly
    assert gemma.head_dim == 16
    assert gemma.query_pre_attn_scalar == 16  # it equalled head_dim before, so it still does


def test_layer_types_keep_one_layer_of_each_kind():
    gemma = T.AutoConfig.for_model("gemma3_text")  # 5 sliding layers, then 1 full, repeated
    assert gemma.layer_types[:2] == ["sliding_attention", "sliding_attention"]
    assert shrink_config(gemma).layer_types == ["sliding_attention", "full_attention"]
    qwen = shrink_config(T.AutoConfig.for_model("qwen3_next"))
    assert qwen.layer_types == ["linear_attention", "full_attention"]
    assert qwen.linear_num_value_heads == 4 and qwen.linear_key_head_dim == 16


def test_mla_ranks_and_head_parts_shrink_consistently():
    deepseek = shrink_config(T.AutoConfig.for_model("deepseek_v3"))
    assert (deepseek.kv_lora_rank, deepseek.q_lora_rank) == (32, 32)
    assert (deepseek.qk_nope_head_dim, deepseek.qk_rope_head_dim, deepseek.v_head_dim) == (16, 8, 16)
    assert deepseek.qk_head_dim == 16 + 8
    assert deepseek.head_dim == deepseek.qk_rope_head_dim
    assert (deepseek.n_routed_experts, deepseek.num_experts_per_tok, deepseek.n_group) == (4, 2, 1)


def test_sub_configs_shrink_too():
    gemma3 = shrink_config(T.AutoConfig.for_model("gemma3"))
    assert gemma3.text_config.hidden_size == 64 and gemma3.vision_config.hidden_size == 64
    assert gemma3.vision_config.num_hidden_layers == 2


@pytest.mark.parametrize("model_type", REPRESENTATIVE)
def test_tiny_causal_lm_runs_forward_and_backward(model_type):
    model = tiny_causal_lm(model_type)

    assert model.training
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    loss = model(**example_batch(model)).loss
    assert math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None for g in grads) > len(grads) // 2


def test_tiny_causal_lm_accepts_a_config_and_is_seeded():
    config = T.AutoConfig.for_model("llama")
    first, again, other = (tiny_causal_lm(config, seed=s) for s in (0, 0, 1))
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])
    assert first.config._attn_implementation == "eager"


def test_heterogeneous_config_keeps_its_per_layer_ratio():
    # Gemma 4's full-attention layers have twice the global head_dim.
    gemma4 = shrink_config(T.AutoConfig.for_model("gemma4_text"))
    assert gemma4.layer_types == ["sliding_attention", "full_attention"]
    assert gemma4.per_layer_config[0].head_dim == 16
    assert gemma4.per_layer_config[1].head_dim == 32


def test_unknown_model_type_raises_value_error():
    with pytest.raises(ValueError, match="unknown model type 'no_such_model'"):
        tiny_causal_lm("no_such_model")


def test_model_that_is_not_a_causal_lm_raises_value_error():
    with pytest.raises(ValueError, match="cannot build a tiny 'vit'"):
        tiny_causal_lm("vit")


def test_example_batch_ids_are_in_range():
    model = tiny_causal_lm("gpt2")
    batch = example_batch(model, batch=3, length=50, seed=1)
    ids = batch["input_ids"]
    assert ids.shape == (3, 50) and ids.dtype == torch.long
    assert int(ids.min()) >= 3 and int(ids.max()) < model.config.vocab_size
    assert torch.equal(batch["labels"], ids)
    assert torch.equal(example_batch(model, batch=3, length=50, seed=1)["input_ids"], ids)


def test_example_batch_avoids_special_token_ids():
    model = tiny_causal_lm("gemma3")  # has image placeholder tokens inside the vocabulary
    ids = example_batch(model, length=400)["input_ids"]
    assert model.config.image_token_id < 256
    assert not torch.isin(ids, torch.tensor([model.config.image_token_id, model.config.boi_token_id])).any()


def test_causal_lm_types_lists_the_auto_mapping():
    types = causal_lm_types()
    assert types == sorted(types)
    assert {"llama", "gpt2", "mixtral"} <= set(types)


def test_import_does_not_need_transformers():
    code = "import sys, dropbp.tiny; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tiny_causal_lm_is_seeded_by_its_argument_and_leaves_the_global_rng_alone():
    import torch

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = tiny_causal_lm("llama", seed=5)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream continues where it was
    second = tiny_causal_lm("llama", seed=5)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name


def test_the_library_does_not_import_its_test_helpers():
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "src" / "dropbp"
    importers = [p.name for p in package.rglob("*.py") if p.name != "testing.py" and "dropbp.testing" in p.read_text()]
    assert not importers
