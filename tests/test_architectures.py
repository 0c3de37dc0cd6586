"""Every architecture in the table (and the fallback), built from a tiny config."""

import pytest
import torch
import transformers as T

import dropbp
from dropbp.architectures import BRANCH_PATTERNS, find_model_type, resolve_branches
from dropbp.reference import detach_branches

SMALL = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    num_hidden_layers=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size=64)

CONFIGS = {
    "llama": lambda: T.LlamaConfig(**SMALL),
    "mistral": lambda: T.MistralConfig(**SMALL),
    "mixtral": lambda: T.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": lambda: T.Qwen2Config(**SMALL),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=16),
    "qwen3": lambda: T.Qwen3Config(**SMALL, head_dim=8),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**SMALL, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=16),
    "gemma": lambda: T.GemmaConfig(**SMALL, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**SMALL, head_dim=8),
    "gemma3_text": lambda: T.Gemma3TextConfig(**SMALL, head_dim=8),
    "phi3": lambda: T.Phi3Config(**SMALL),
    "starcoder2": lambda: T.Starcoder2Config(**SMALL),
    "olmo2": lambda: T.Olmo2Config(**SMALL),
    "granite": lambda: T.GraniteConfig(**SMALL),
    "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **TOKENS),
    "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_hidden_layers=2, **TOKENS),
    "falcon": lambda: T.FalconConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, **TOKENS),
    "opt": lambda: T.OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=2,
                               word_embed_proj_dim=32, max_position_embeddings=64, **TOKENS),
    "bloom": lambda: T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **TOKENS),
    "mpt": lambda: T.MptConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **TOKENS),
}

# Not in the table: found by the generic fallback (decoder layer list + attention/MLP children).
FALLBACK = {
    "phi": lambda: T.PhiConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                               **TOKENS),
    "gptj": lambda: T.GPTJConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, **TOKENS),
}


@pytest.mark.parametrize("model_type", ["bloom", "mpt"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_residual_inside_architectures_under_checkpointing(model_type, reentrant, batch):
    """Spans that end before the residual add give the same gradients with gradient checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = build(CONFIGS[model_type])
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        handle = dropbp.apply(model, auto_step=False)
        handle.set_mask([True, False, False, True])
        model(batch, labels=batch).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        assert (plain is None) == (checkpointed is None)
        if plain is not None:
            torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def build(make_config):
    torch.manual_seed(0)
    config = make_config()
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
                "attention_probs_dropout_prob", "hidden_dropout_prob"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    return T.AutoModelForCausalLM.from_config(config)


def check_mechanism(make_config, batch):
    """Fixed-mask gradients equal the detach reference; dropped branches get no gradient."""
    model = build(make_config)
    model.train()
    handle = dropbp.apply(model, auto_step=False)
    assert len(handle.branches) == 2 * model.config.num_hidden_layers
    mask = [i % 3 == 0 for i in range(len(handle.branches))]

    with handle.paused(), detach_branches([b.end_module for b in handle.branches], mask):
        reference_loss = model(batch, labels=batch).loss
        reference = torch.autograd.grad(reference_loss, list(model.parameters()), allow_unused=True)

    handle.set_mask(mask)
    loss = model(batch, labels=batch).loss
    got = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert torch.equal(loss, reference_loss)
    for g, r in zip(got, reference):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    params = dict((id(p), g) for p, g in zip(model.parameters(), got))
    for branch, dropped in zip(handle.branches, mask):
        own = [params[id(p)] for p in branch.parameters()]
        if dropped:
            assert all(g is None for g in own), branch.name
        else:
            assert any(g is not None for g in own), branch.name
    assert all(f is not None and f > 0 for f in handle.flops)
    return handle


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_table_architecture(model_type, batch):
    assert model_type in BRANCH_PATTERNS
    handle = check_mechanism(CONFIGS[model_type], batch)
    assert find_model_type(handle.model) == model_type


def test_opt_mlp_is_a_span(batch):
    handle = check_mechanism(CONFIGS["opt"], batch)
    mlp = handle.branches[1]
    assert mlp.name == "model.decoder.layers.0.fc1..fc2"
    layer = handle.model.model.decoder.layers[0]
    assert mlp.module is layer.fc1 and mlp.end_module is layer.fc2


def test_parallel_residual_gpt_neox_drops_something(batch):
    handle = check_mechanism(CONFIGS["gpt_neox"], batch)
    assert handle.model.config.use_parallel_residual
    assert [b.name.rsplit(".", 1)[1] for b in handle.branches] == ["attention", "mlp"] * 2


@pytest.mark.parametrize("model_type", sorted(FALLBACK))
def test_generic_fallback(model_type, batch):
    assert model_type not in BRANCH_PATTERNS
    handle = check_mechanism(FALLBACK[model_type], batch)
    assert all(("attn" in b.name) or ("mlp" in b.name) for b in handle.branches)


def test_fallback_skips_hyper_connections():
    """HY-V4 wraps each branch in a hyper-connection (`attn_hc`, `ffn_hc`) that mixes the stream: not a branch."""
    from dropbp.tiny import tiny_causal_lm

    names = [s.name for s in resolve_branches(tiny_causal_lm("hy_v4"))]
    assert names == [f"model.layers.{i}.{b}" for i in range(2) for b in ("self_attn", "mlp")]


def test_llama_order_and_explicit_patterns():
    model = build(CONFIGS["llama"])
    assert [s.name for s in resolve_branches(model)] == [
        "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp",
    ]
    assert [s.name for s in resolve_branches(model, ["*.layers.1.mlp"])] == ["model.layers.1.mlp"]
    assert [s.name for s in resolve_branches(model, "*.layers.0.mlp")] == ["model.layers.0.mlp"]


def test_nested_patterns_are_refused():
    with pytest.raises(ValueError, match="nested inside branch 'model.layers.0.mlp'"):
        resolve_branches(build(CONFIGS["llama"]), ["model.layers.0.mlp", "*.mlp.up_proj"])


def test_whole_decoder_layer_is_refused():
    with pytest.raises(ValueError, match="'model.layers.0' as a branch: it is a whole decoder layer") as error:
        resolve_branches(build(CONFIGS["llama"]), ["model.layers.*"])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("model_type", "patterns", "module"), [
    ("bloom", ["*.h.*.self_attention", "*.h.*.mlp"], "transformer.h.0.self_attention"),
    ("mpt", ["*.blocks.*.ffn"], "transformer.blocks.0.ffn"),
])
def test_modules_that_take_the_residual_are_refused(model_type, patterns, module):
    with pytest.raises(ValueError, match=f"cannot pick '{module}' as a branch: its forward takes the residual"):
        resolve_branches(build(CONFIGS[model_type]), patterns)


def all_dropped_stream_gradients(model, batch):
    """With every branch dropped: gradients at the first layer's input and the last layer's output."""
    layers = model.transformer.h if hasattr(model.transformer, "h") else model.transformer.blocks
    seen = {}

    def start(module, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_()
        seen["start"] = x
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    def end(module, args, output):
        seen["end"] = output[0] if isinstance(output, tuple) else output
        seen["end"].retain_grad()

    hooks = [layers[0].register_forward_pre_hook(start, with_kwargs=True, prepend=True),
             layers[-1].register_forward_hook(end)]
    handle = dropbp.apply(model, auto_step=False)
    handle.set_mask([True] * len(handle.branches))
    loss = model(batch, labels=batch).loss
    loss.backward()
    for h in hooks:
        h.remove()
    return seen["start"].grad, seen["end"].grad


@pytest.mark.parametrize("model_type", ["bloom", "mpt"])
def test_residual_inside_architectures_keep_the_stream_intact(model_type, batch):
    """The reference: with every branch dropped each layer is the identity, so the gradient passes unchanged."""
    start, end = all_dropped_stream_gradients(build(CONFIGS[model_type]), batch)
    assert start is not None and bool(start.abs().sum() > 0)
    torch.testing.assert_close(start, end, rtol=0, atol=0)


def test_unknown_architecture_lists_supported_ones():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"supported: .*llama.*branches="):
        dropbp.apply(model)


def test_bad_span_sibling():
    with pytest.raises(ValueError, match="no sibling module 'fc9'"):
        resolve_branches(build(CONFIGS["opt"]), ["*.layers.*.fc1..fc9"])


def test_readme_table_lists_every_row():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("## Architectures"): readme.index("## The `dropbp` command")]
    for model_type in BRANCH_PATTERNS:
        assert model_type in table, f"README's architecture table misses {model_type}"


@pytest.mark.parametrize("model_type", ["llama", "phi"])
def test_names_see_through_wrapper_modules(model_type, batch):
    """checkpoint_wrapper (like FSDP1 and torch.compile) inserts a module name; branches keep theirs."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    make_config = {**CONFIGS, **FALLBACK}[model_type]
    plain_names = [b.name for b in dropbp.apply(build(make_config)).branches]
    model = build(make_config)
    layer_class = type(model.model.layers[0])
    apply_activation_checkpointing(model, checkpoint_wrapper, check_fn=lambda m: isinstance(m, layer_class))
    assert any(name.endswith("_checkpoint_wrapped_module") for name, _ in model.named_modules())
    handle = dropbp.apply(model, auto_step=False)
    assert [b.name for b in handle.branches] == plain_names
    # Checkpointed outside Hugging Face's switch: dropped branches are recomputed, gradients stay exact.
    handle.remove()
    reference = build(make_config)
    reference.load_state_dict(model.state_dict())
    mask = [i % 3 == 0 for i in range(len(plain_names))]
    grads = []
    for m in (reference, model):
        h = dropbp.apply(m, auto_step=False)
        h.set_mask(mask)
        m.train()
        loss = m(batch, labels=batch).loss
        grads.append(torch.autograd.grad(loss, list(m.parameters()), allow_unused=True))
    for got, expected in zip(grads[1], grads[0]):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_a_span_whose_last_module_never_runs_is_refused(batch):
    """Bloom with slow_but_exact multiplies by dense.weight directly: the span would never close."""
    model = build(lambda: T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, pretraining_tp=2, slow_but_exact=True,
                                        **TOKENS))
    model.train()
    handle = dropbp.apply(model, drop_rate=0.5, auto_step=False)
    handle.set_mask([True, False, False, False])
    with pytest.raises(dropbp.DropBPError, match="started but its last module never ran"):
        model(batch, labels=batch)
    assert torch.is_grad_enabled()
    handle.set_mask([False] * 4)  # nothing dropped: the hooks still see the span open, and still refuse
    with pytest.raises(dropbp.DropBPError, match="query_key_value..dense"):
        model(batch, labels=batch)
