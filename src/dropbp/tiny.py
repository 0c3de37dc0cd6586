"""Tiny random-weight versions of Hugging Face causal LMs, built from their configs.

DropBP must work on any architecture ``AutoModelForCausalLM`` can build. Downloading real
checkpoints to check that is slow, so :func:`tiny_causal_lm` takes the default config of a
model type (or any config), shrinks every size in it and builds the model with random
weights: at most a few hundred thousand parameters for most types, a forward and backward
pass on CPU in milliseconds.

The shrinking is data driven. :data:`TINY_SIZES` maps groups of attribute names that mean
the same thing in different configs (``hidden_size``, ``n_embd``, ``d_model``...) to one tiny
value, applied to whichever of them a config stores. A few rules keep what configs derive
from those sizes consistent (grouped KV heads, per-layer lists, products such as
``num_heads * head_dim == expand * hidden_size``); each says why it exists. Per-model
special cases are limited to :data:`_OVERRIDES`.

``transformers`` is imported inside the functions: ``import dropbp`` must not need it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["TINY_SIZES", "causal_lm_types", "example_batch", "shrink_config", "tiny_causal_lm"]

_TINY_WIDTH = 64
_TINY_HEAD_DIM = 16
_TINY_VOCAB = 256

# Name groups the shrinking code refers to; TINY_SIZES gives their tiny values.
_WIDTH = (
    "hidden_size", "n_embd", "d_model", "dim", "embed_dim", "emb_dim", "embedding_dim", "embedding_size",
    "word_embed_proj_dim", "input_embedding_size", "output_embedding_size", "hidden_size_global", "out_hidden_size",
    "output_channels", "router_hidden_size", "pronunciation_embed_dim", "shape_embed_dim",
)
_DEPTH = (
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers",
    "num_decoder_layers", "num_encoder_layers", "num_blocks", "num_layers_per_stack",
)
# SSM head counts are not here: they follow from the inner width (see _RELATIONS).
_HEADS = (
    "num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads", "decoder_attention_heads",
    "encoder_attention_heads", "swa_num_attention_heads", "linear_num_heads", "linear_num_value_heads",
    "index_n_heads", "num_attention_heads_per_layer",
)
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_EXPERTS_PER_TOKEN = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_top_k", "moe_topk", "top_k")

#: Groups of config attributes meaning the same size, and the tiny value each gets. Only
#: attributes a config stores as an integer (or a list of integers, one per layer) change;
#: ``None`` usually means "derive me", which then derives from the tiny sizes.
TINY_SIZES: tuple[tuple[tuple[str, ...], int], ...] = (
    # Model width, depth, attention heads (KV heads follow the heads, see _kv_heads).
    (_WIDTH, _TINY_WIDTH),
    (_DEPTH, 2),
    (_HEADS, 4),
    # Per-head sizes: 4 heads of 16 make the width of 64.
    (
        (
            "head_dim", "d_head", "d_kv", "dim_head", "attention_head_dim", "attention_head_size", "kv_channels",
            "v_head_dim", "qk_nope_head_dim", "swa_head_dim", "index_head_dim", "linear_head_dim",
            "linear_key_head_dim", "linear_value_head_dim", "mamba_d_head", "mamba_head_dim", "mamba_headdim",
        ),
        _TINY_HEAD_DIM,
    ),
    # Rotary part of MLA heads (DeepSeek style): half a head.
    (("qk_rope_head_dim",), 8),
    # Low-rank projections of MLA attention.
    (("kv_lora_rank", "q_lora_rank", "o_lora_rank"), 32),
    # Dense feed-forward width, and other inner widths (SSM inner width of Falcon-H1).
    (
        (
            "intermediate_size", "ffn_dim", "n_inner", "d_ff", "dff", "dim_ff", "feed_forward_size",
            "ffn_hidden_size", "decoder_ffn_dim", "encoder_ffn_dim", "intermediate_size_mlp",
            "dense_intermediate_size", "mlp_dim", "d_inner", "mamba_d_ssm",
        ),
        128,
    ),
    # Per-expert feed-forward width, routed and shared.
    (
        (
            "moe_intermediate_size", "expert_ffn_hidden_size", "shared_expert_intermediate_size",
            "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size", "shared_intermediate_size",
        ),
        32,
    ),
    # Routed experts, and experts per token.
    (_EXPERTS, 4),
    (_EXPERTS_PER_TOKEN, 2),
    # SSM state, and the rank of its time-step projection (ceil(64 / 16)).
    (("state_size", "ssm_state_size", "mamba_d_state"), 16),
    (("time_step_rank", "mamba_dt_rank"), 4),
    (("vocab_size",), _TINY_VOCAB),
)

#: Widths stored as a multiple of the model width (RWKV's attention width equals it, Zamba's
#: concatenated attention input is twice it, Phi-4's audio convolutions match it): keep the
#: multiple.
_WIDTH_MULTIPLES = (
    "attention_hidden_size", "lru_width", "ple_embed_dim", "ext_pw_out_channel", "depthwise_separable_out_channel",
    "nemo_conv_channels",
)

#: Counts that are only lowered: the tiny model keeps a small original value (0 or 1 shared
#: experts, a dense first layer...) instead of having one invented.
_CAPS: tuple[tuple[tuple[str, ...], int], ...] = (
    (("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    # Dense layers before the MoE ones: at most one, so layer 1 is still MoE.
    (("first_k_dense_replace", "num_dense_layers"), 1),
    # Expert groups (DeepSeek routing) must divide 4 experts; one group of all of them.
    (("n_group", "topk_group", "num_expert_group"), 1),
    # Identity ("zero") experts of LongCat-Flash, added to the routed ones.
    (("zero_expert_num",), 2),
    # Layer patterns "every n-th layer": with 2 layers, n = 2 keeps one layer of each kind.
    (
        (
            "sliding_window_pattern", "_sliding_window_pattern", "global_attn_every_n_layers",
            "interleave_moe_layer_step", "moe_layer_interval", "decoder_sparse_step", "no_rope_layer_interval",
            "attn_layer_period", "expert_layer_period",
        ),
        2,
    ),
    # SSM groups must divide the SSM heads (8 after shrinking).
    (("n_groups", "mamba_n_groups", "mamba_ngroups"), 2),
    # Learned position tables would dominate the parameter count; 8 tokens are all we need.
    (
        (
            "max_position_embeddings", "n_positions", "n_ctx", "max_target_positions", "max_source_positions",
            "max_seq_len", "context_length",
        ),
        512,
    ),
    # Windows, chunks and sparse top-k shorter than the 8-token example batch, so the
    # windowed / chunked / sparse code paths run (and stay cheap: SSM scans pad to a chunk).
    (
        (
            "sliding_window", "sliding_window_size", "attention_window_size", "local_attention_window_len",
            "window_size", "local_attention", "chunk_size", "mamba_chunk_size", "index_topk",
        ),
        4,
    ),
    # Per-layer input embeddings of Gemma 3n / 4: a vocab-by-layers-by-this table.
    (("hidden_size_per_layer_input",), 16),
    # Rounding of derived widths (LFM2 rounds its FFN up to a multiple of 256).
    (("block_multiple_of", "ffn_round_up_to_multiple_of"), 16),
    # Low ranks of adapters and hyper-connections.
    (("hc_lowrank", "adapter_rank", "laurel_rank"), 16),
    # BLT feeds its global transformer (width 64 here, like every width) the local width times
    # this; 1 keeps the two equal.
    (("cross_attn_k",), 1),
    # Multi-token-prediction heads are extra decoder layers.
    (("num_nextn_predict_layers", "num_mtp_layers"), 1),
    # Layers reusing an earlier layer's KV cache (Gemma 3n / 4): every layer type must keep a
    # producing layer before the sharing ones, which 2 layers of 2 types cannot.
    (("num_kv_shared_layers",), 0),
)

#: KV-head counts; see _kv_heads for the value.
_KV_HEADS = (
    "num_key_value_heads", "num_kv_heads", "kv_n_heads", "num_query_groups", "multi_query_group_num",
    "swa_num_key_value_heads", "linear_num_key_heads",
)

#: Other vocabularies (decoder, per-layer input, hash n-grams, RoCBert's shape and
#: pronunciation tables): at most the tiny vocabulary.
_VOCAB = re.compile(r"vocab(?!_offset)(?!.*divisible)")

#: Float attributes set to 0 so the tiny model is deterministic in train() mode.
_DROPOUT = re.compile(r"dropout|drop_prob|pdrop|layerdrop|jitter")

#: Special token ids: remapped into the tiny vocabulary (pad/bos/eos to 0/1/2).
_TOKEN_ID = re.compile(r"_token_(id|index)$")

#: Names of layer-index lists (``mlp_only_layers``, ``full_attn_idxs``, ``hybrid_layer_ids``...).
_LAYER_INDICES = re.compile(r"layer|idx|index|ids")

#: Lists of layer kinds that a model cycles through instead of listing every layer.
_LAYER_PATTERN = re.compile(r"_types?$")

#: Derived sizes: ``target == fn(*sources)``. If it held in the original config it is made to
#: hold again after shrinking, so configs that store a derived value stay consistent.
_RELATIONS: tuple[tuple[str, tuple[str, ...], Callable[..., int]], ...] = (
    # MLA: a query/key head is its no-rope part plus its rope part.
    ("qk_head_dim", ("qk_nope_head_dim", "qk_rope_head_dim"), lambda a, b: a + b),
    # DeepSeek-style configs set head_dim to the rotary width (the rotary embedding reads it).
    ("head_dim", ("qk_rope_head_dim",), lambda a: a),
    # Attention over a wider-than-model input (Zamba): heads tile that width.
    ("attention_head_dim", ("attention_hidden_size", "num_attention_heads"), lambda w, n: w // n),
    # SSM heads tile the inner width: heads * head_dim == expand * hidden (Mamba-2 style) or
    # == d_ssm (Falcon-H1). The head count follows, the head size stays 16.
    *(
        (heads, (expand, "hidden_size", dim), lambda e, h, d: e * h // d)
        for heads in ("num_heads", "mamba_n_heads", "mamba_num_heads", "n_mamba_heads")
        for expand in ("expand", "mamba_expand")
        for dim in ("head_dim", "mamba_d_head", "mamba_head_dim", "mamba_headdim")
    ),
    ("mamba_n_heads", ("mamba_d_ssm", "mamba_d_head"), lambda w, d: w // d),
    # Shared experts as one wide MLP: n_shared * per-expert width.
    ("shared_expert_intermediate_size", ("moe_intermediate_size", "n_shared_experts"), lambda a, n: a * n),
    # HRM stores its depth inflated by its recurrence: layers per stack * H * (L + 1).
    ("num_hidden_layers", ("num_layers_per_stack", "H_cycles", "L_cycles"), lambda n, h, l: n * h * (l + 1)),
    # Gemma scales queries by head_dim**-0.5 through this.
    ("query_pre_attn_scalar", ("head_dim",), lambda d: d),
)

#: Per-model fixes the generic rules cannot express, applied after shrinking, keyed by
#: ``model_type``; ``"a.b"`` sets ``b`` on sub-config ``a``. Keep this small; each entry says why.
_OVERRIDES: dict[str, dict[str, Any]] = {
    # The default configs leave settings unset that the attention reads unconditionally
    # (DBRX: the released model's values; Command: a plain rotary embedding).
    "dbrx": {"attn_config.rope_theta": 500000.0, "attn_config.clip_qkv": 8.0},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # Zamba ties the shared attention block of every hybrid layer to the first one and
    # rejects a model with a single hybrid layer; both layers hybrid (each also has Mamba).
    "zamba": {"layers_block_type": ["hybrid", "hybrid"]},
    # The default config leaves layer_types unset although the model indexes it (LFM2 has
    # short-convolution and attention layers).
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # The default config has MoE layers but leaves the shared-expert count unset.
    "dots1": {"n_shared_experts": 1},
    # The default config has indexed-attention layers but no indexer sizes.
    "qwen4_exp_text": {
        "indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 4,
        "indexer_compress_ratio": 2,
    },
    # Reformer trains only on sequences exactly as long as its axial position grid and a
    # multiple of its chunk lengths: 2 x 4 for example_batch's 8 tokens. The axial
    # embedding parts add up to the width.
    "reformer": {
        "axial_pos_shape": (2, 4), "axial_pos_embds_dim": (16, 48), "local_attn_chunk_length": 4,
        "lsh_attn_chunk_length": 4, "num_buckets": 2,
    },
}


def _get(config: Any, name: str) -> Any:
    """The value ``config`` itself stores for ``name`` (through attribute_map), else None.

    Only stored values count: ``hasattr`` would also find read-only properties.
    """
    name = type(config).attribute_map.get(name, name) if hasattr(type(config), "attribute_map") else name
    return vars(config).get(name)


def _set(config: Any, name: str, value: Any) -> None:
    name = type(config).attribute_map.get(name, name) if hasattr(type(config), "attribute_map") else name
    setattr(config, name, value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_ints(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(_is_int(v) for v in value)


def _resize(value: Any, new: Callable[[int], int]) -> Any:
    """Apply ``new`` to an int, or to each int of a per-layer list of ints."""
    if _is_int(value):
        return new(value)
    return type(value)(new(v) for v in value)


def _kv_heads(original: int, original_heads: Any) -> int:
    """Keep the kind of attention: multi-head stays multi-head (4 KV heads), multi-query stays
    one KV head, grouped-query becomes 2 KV heads for the 4 query heads."""
    if _is_int(original_heads) and original >= original_heads:
        return 4
    return 1 if original == 1 else 2


def _second_layer(lists: list[list[Any]], layers: int) -> int:
    """The original layer to keep as layer 1: the one differing from layer 0 in most per-layer
    lists (a hybrid keeps an attention layer and a Mamba layer, a dense-first MoE a MoE
    layer), the first such on a tie, layer 1 if all layers are alike."""
    best, best_score = 1, 0
    for i in range(1, layers):
        score = sum(values[i] != values[0] for values in lists)
        if score > best_score:
            best, best_score = i, score
    return best


def _shrink_layer_lists(config: Any, layers: int, per_layer: dict[int, dict[str, Any]]) -> int:
    """Rebuild lists that describe layers for 2 layers; returns the original index of layer 1.

    A list as long as the original depth holds one entry per layer (``layer_types``,
    ``mlp_layer_types``...): keep layer 0 and :func:`_second_layer`. A shorter list of
    layer indices (``mlp_only_layers=[3, 7]``) keeps those of the two kept layers, or names
    the last layer if it loses all. A shorter list of layer kinds (a pattern the model cycles
    through) keeps its first kind and the first other kind.
    """
    lists = {
        name: value
        for name, value in vars(config).items()
        if isinstance(value, (list, tuple)) and len(value) == layers and not name.startswith("_")
    }
    overrides = [per_layer.get(i, {}) for i in range(layers)]
    second = _second_layer([*lists.values(), overrides], layers)
    for name, value in lists.items():
        setattr(config, name, type(value)([value[0], value[second]]))
    for name, value in list(vars(config).items()):
        if name in lists or not isinstance(value, (list, tuple)) or not value:
            continue
        if all(_is_int(i) and 0 <= i < layers for i in value) and _LAYER_INDICES.search(name):
            kept = [new for new, old in enumerate((0, second)) if old in value]
            setattr(config, name, type(value)(kept or [1]))
        elif all(isinstance(v, str) for v in value) and _LAYER_PATTERN.search(name) and len(value) > 2:
            other = next((v for v in value if v != value[0]), value[0])
            setattr(config, name, type(value)([value[0], other]))
    return second


def _all_configs(config: Any) -> list[Any]:
    """``config`` and its sub-configs, recursively, parents first."""
    from transformers import PretrainedConfig

    subs = [v for v in vars(config).values() if isinstance(v, PretrainedConfig)]
    return [config, *(c for sub in subs for c in _all_configs(sub))]


def _ids(value: Any) -> list[int]:
    return [v for v in (value if isinstance(value, list) else [value]) if _is_int(v)]


def _remap_token_ids(config: Any, vocab: int) -> None:
    """Move the special token ids of a config tree into the tiny vocabulary.

    One mapping for the whole tree, so equal ids stay equal across levels (a composite
    config's ``image_token_id`` and its text config's). pad, bos and eos go to 0, 1 and 2
    (what :func:`example_batch` avoids); other special tokens (image, audio...) to the top of
    the vocabulary.
    """
    configs = _all_configs(config)
    mapping: dict[int, int] = {}
    for role, new in (("pad", 0), ("bos", 1), ("eos", 2)):
        for level in configs:
            for old in _ids(vars(level).get(f"{role}_token_id")):
                if old not in mapping and new not in mapping.values():
                    mapping[old] = new
    for level in configs:
        for name, value in vars(level).items():
            for old in _ids(value) if _TOKEN_ID.search(name) else []:
                mapping.setdefault(old, vocab - 1 - sum(v >= 3 for v in mapping.values()))
    for level in configs:
        for name, value in list(vars(level).items()):
            if _TOKEN_ID.search(name) and isinstance(value, list):
                setattr(level, name, [mapping.get(v, v) for v in value])
            elif _TOKEN_ID.search(name) and _is_int(value):
                setattr(level, name, mapping[value])


def _fill_missing(config: Any, original: dict[str, Any]) -> None:
    """Give sizes some default configs leave ``None`` (though their model needs them) the
    value the usual convention derives: head_dim = width / heads, KV heads = heads, and for
    a MoE config (it sets expert widths or counts) 4 experts with 2 per token."""
    if "head_dim" in vars(config) and config.head_dim is None and _is_int(_get(config, "num_attention_heads")):
        config.head_dim = _TINY_HEAD_DIM
    if "num_key_value_heads" in vars(config) and config.num_key_value_heads is None:
        config.num_key_value_heads = _get(config, "num_attention_heads")
    moe_evidence = ("moe_intermediate_size", *_EXPERTS, *_EXPERTS_PER_TOKEN)
    if any(_is_int(original.get(n)) for n in moe_evidence):
        for group, tiny in ((_EXPERTS, 4), (_EXPERTS_PER_TOKEN, 2)):
            stored = [n for n in group if n in vars(config)]
            if stored and all(vars(config)[n] is None for n in stored):
                setattr(config, stored[0], tiny)


def _shrink_in_place(config: Any) -> None:
    """Shrink one config level, then its sub-configs."""
    from transformers import PretrainedConfig

    # Heterogeneous configs (per-layer overrides): shrink homogeneously, re-add the overrides
    # of the two kept layers afterwards.
    spec = vars(config).pop("_heterogeneity_spec", None)
    per_layer = dict(spec.per_layer_overrides) if spec is not None else {}
    before = copy.deepcopy(config) if per_layer else None

    names = {n for group, _ in (*TINY_SIZES, *_CAPS) for n in group} | set(_KV_HEADS) | set(_WIDTH_MULTIPLES)
    names |= {n for target, sources, _ in _RELATIONS for n in (target, *sources)}
    original = {n: _get(config, n) for n in names}
    width, layers, heads = (
        next((original[n] for n in group if _is_int(original[n])), None) for group in (_WIDTH, _DEPTH, _HEADS)
    )

    for group, tiny in TINY_SIZES:
        for name in group:
            if _is_int(original[name]) or _is_ints(original[name]):
                _set(config, name, _resize(original[name], lambda _, tiny=tiny: tiny))
    for name in _WIDTH_MULTIPLES:
        if _is_int(original[name]) and width and original[name] % width == 0:
            _set(config, name, original[name] // width * _TINY_WIDTH)
    for group, cap in _CAPS:
        for name in group:
            if _is_int(original[name]):
                _set(config, name, min(original[name], cap))
    for name in _KV_HEADS:
        if _is_int(original[name]) or _is_ints(original[name]):
            _set(config, name, _resize(original[name], lambda kv: _kv_heads(kv, heads)))
    for name, value in list(vars(config).items()):
        if _VOCAB.search(name) and _is_int(value) and value > _TINY_VOCAB:
            setattr(config, name, _TINY_VOCAB)
    for target, sources, fn in _RELATIONS:
        old = [original[s] for s in sources]
        if _is_int(original[target]) and all(_is_int(v) and v for v in old) and original[target] == fn(*old):
            _set(config, target, fn(*(_get(config, s) for s in sources)))
    _shrink_rotary_dim(config, original, width, heads)
    _fill_missing(config, original)

    second = _shrink_layer_lists(config, layers, per_layer) if _is_int(layers) and layers > 2 else 1
    for name, value in list(vars(config).items()):
        if isinstance(value, float) and _DROPOUT.search(name):
            setattr(config, name, 0.0)
    if "use_cache" in vars(config):
        config.use_cache = False
    for path, value in _OVERRIDES.get(getattr(config, "model_type", ""), {}).items():
        *parents, name = path.split(".")
        target = config
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, copy.deepcopy(value))

    for value in vars(config).values():
        if isinstance(value, PretrainedConfig):
            _shrink_in_place(value)
    if per_layer:
        _restore_per_layer(config, before, per_layer, {0: 0, 1: second})


def _shrink_rotary_dim(config: Any, original: dict[str, Any], width: Any, heads: Any) -> None:
    """Keep rotary widths consistent with the tiny heads.

    ``rotary_dim`` (GPT-J, CodeGen...) rotates a fraction of each head: keep the fraction.
    MLA configs whose rotary embedding is ``head_dim * partial_rotary_factor`` wide must stay
    as wide as ``qk_rope_head_dim``: set ``head_dim`` to match.
    """
    rotary = vars(config).get("rotary_dim")
    head = original.get("head_dim") or (width // heads if _is_int(width) and _is_int(heads) else None)
    if _is_int(rotary) and head:
        config.rotary_dim = max(2, round(rotary / head * _TINY_HEAD_DIM / 2) * 2)
    rope = vars(config).get("rope_parameters")
    parts = list(rope.values()) if isinstance(rope, dict) else []
    factors = {p.get("partial_rotary_factor") for p in (rope, *parts) if isinstance(p, dict)} - {None}
    old_rope = original.get("qk_rope_head_dim")
    if len(factors) == 1 and _is_int(original.get("head_dim")) and _is_int(old_rope):
        factor = factors.pop()
        if original["head_dim"] * factor == old_rope:
            config.head_dim = round(config.qk_rope_head_dim / factor)


def _restore_per_layer(config: Any, before: Any, per_layer: dict[int, dict[str, Any]], kept: dict[int, int]) -> None:
    """Re-add the per-layer overrides of the kept layers (``kept``: new index -> old index).

    Each layer's config is shrunk like a whole config. Where that makes an overridden size
    equal to the global one (both become 16...), the original ratio is kept instead (a layer
    with twice the global head_dim gets 32), so the tiny model stays heterogeneous.
    """
    overrides = {}
    for new, old in kept.items():
        layer = copy.deepcopy(before)
        for name, value in per_layer.get(old, {}).items():
            if name != "skip":
                _set(layer, name, copy.deepcopy(value))
        _shrink_in_place(layer)
        changed = {}
        for name, value in per_layer.get(old, {}).items():
            if name == "skip":
                changed[name] = value
                continue
            tiny, global_old, global_tiny = _get(layer, name), _get(before, name), _get(config, name)
            sizes = (value, global_old, global_tiny)
            if tiny == global_tiny and value != global_old and all(_is_int(v) and v for v in sizes):
                tiny = max(1, round(global_tiny * value / global_old))
            if tiny != global_tiny:
                changed[name] = tiny
        if changed:
            overrides[new] = changed
    if overrides:
        config.per_layer_config = overrides


def shrink_config(config: PretrainedConfig) -> PretrainedConfig:
    """Return a tiny copy of a Hugging Face config, for a fast random-weight model.

    Sizes follow :data:`TINY_SIZES`: hidden size 64, 2 layers, 4 attention heads (2 KV heads
    where the model groups them, 1 where it has multi-query attention), head_dim 16 where the
    config sets it, feed-forward 128, 4 experts with 2 per token and expert width 32, MLA
    ranks 32, SSM state 16, vocab 256. Dropout probabilities become 0, ``use_cache`` False,
    per-layer lists are rebuilt for 2 layers (keeping one layer of each kind where a model has
    two), windows and chunks are cut below 8 tokens, special token ids are moved into the
    vocabulary, and sub-configs (``text_config``, ``vision_config``...) are shrunk the same way.

    Args:
        config: any ``PretrainedConfig``; it is not modified.

    Returns:
        A deep copy of ``config`` with tiny sizes.

    Raises:
        huggingface_hub.errors.StrictDataclassError: if the config class rejects a tiny value
            (no default config of transformers does); :func:`tiny_causal_lm` reports it as a
            one-line ``ValueError``.
    """
    tiny = copy.deepcopy(config)
    _shrink_in_place(tiny)
    _remap_token_ids(tiny, _TINY_VOCAB)
    return tiny


def causal_lm_types() -> list[str]:
    """Model types ``AutoModelForCausalLM`` knows in the installed transformers.

    Returns:
        The sorted keys of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _default_config(model_type: str) -> PretrainedConfig:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise ValueError(f"unknown model type {model_type!r} (not in this transformers' CONFIG_MAPPING)")
    try:
        return AutoConfig.for_model(model_type)
    except ImportError as error:
        raise ValueError(f"{model_type!r} needs a missing dependency: {_one_line(error)}") from error
    except Exception as error:  # the default config of some types fails its own validation
        raise ValueError(f"the default {model_type!r} config cannot be built: {_one_line(error)}") from error


def tiny_causal_lm(model_type_or_config: str | PretrainedConfig, *, seed: int = 0) -> PreTrainedModel:
    """Build a tiny random-weight causal LM of a model type, in train() mode.

    Args:
        model_type_or_config: a ``model_type`` such as ``"llama"`` (its default config is
            used) or a config object; either way it is shrunk with :func:`shrink_config`.
        seed: the seed of the weights' initialisation (the global RNG is left as it was).

    Returns:
        ``AutoModelForCausalLM.from_config`` of the shrunk config, with eager attention where
        the model supports it (else SDPA, else its default), ``is_decoder`` set where the
        config has that flag. A class that takes only the decoder part of its composite config
        (MusicGen) is built from that part.

    Raises:
        ValueError: with a one-line reason when the model cannot be built here: unknown
            model type, not a causal LM, a missing optional dependency, a config the
            shrinker cannot make consistent...
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if isinstance(model_type_or_config, str):
        name = model_type_or_config
        config = _default_config(name)
    else:
        config = model_type_or_config
        name = getattr(config, "model_type", "") or type(config).__name__
    try:
        config = shrink_config(config)
    except Exception as error:  # a config class may reject a tiny value; say which
        raise ValueError(f"cannot shrink the {name!r} config: {_one_line(error)}") from error
    # A causal LM attends causally: BERT-style classes read this flag (and Reformer asserts it).
    if "is_decoder" in vars(config) and not getattr(config, "is_encoder_decoder", False):
        config.is_decoder = True

    # Some causal-LM classes (MusicGen) are mapped to a composite config but take its decoder
    # part: try that when the whole config does not build.
    builds = [lambda **kw: AutoModelForCausalLM.from_config(config, **kw)]
    decoder = config.get_text_config(decoder=True)
    if decoder is not config and type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        builds.append(lambda **kw: MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._from_config(decoder, **kw))
    errors = []
    for build, attention in ((b, a) for b in builds for a in ("eager", "sdpa", None)):
        # The weights' draws come from the seed, and the caller's RNG is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = build(attn_implementation=attention)
            except ImportError as error:
                raise ValueError(f"{name!r} needs a missing dependency: {_one_line(error)}") from error
            except Exception as error:  # noqa: BLE001 - unsupported attention, or an architecture that cannot build here
                errors.append(error)
                continue
        # X-MOD routes each batch through one language's adapters; without a default it
        # needs a lang_ids input, which a plain causal-LM batch does not have.
        languages = getattr(config, "languages", None)
        if hasattr(model, "set_default_language") and languages:
            model.set_default_language(languages[0])
        return model.train()
    # Report the architecture's own error rather than "this attention is not supported".
    error = next((e for e in errors if "attn" not in str(e).lower()), errors[0])
    raise ValueError(f"cannot build a tiny {name!r}: {_one_line(error)}") from error


def _special_ids(config: Any) -> set[int]:
    """Every special token id a config (or its sub-configs) names."""
    from transformers import PretrainedConfig

    ids: set[int] = set()
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            ids |= _special_ids(value)
        elif _TOKEN_ID.search(name):
            ids |= {v for v in (value if isinstance(value, list) else [value]) if _is_int(v)}
    return ids


def example_batch(
    model: PreTrainedModel, *, batch: int = 2, length: int = 8, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids a model accepts, with themselves as labels.

    Ids are drawn from ``[3, vocab_size)``: 0..2 are pad/bos/eos after :func:`shrink_config`,
    and other special ids the config names (image placeholders...) are left out too, so no
    model takes the batch for padded or multimodal input.

    Args:
        model: a causal LM whose ``config`` (or text sub-config) has ``vocab_size``.
        batch: number of sequences.
        length: tokens per sequence.
        seed: seed of the generator drawing the ids.

    Returns:
        ``{"input_ids": ..., "labels": ...}``, ``(batch, length)`` int64 tensors on the
        model's device, for ``model(**batch)``. A model predicting several parallel codebooks
        (one LM head each, MusicGen) gets ``(batch * codebooks, length)`` ids and
        ``(batch, length, codebooks)`` labels, its documented layout.

    Raises:
        ValueError: if the vocabulary has no ordinary token ids.
    """
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or config.vocab_size
    allowed = torch.tensor(sorted(set(range(3, vocab)) - _special_ids(config)), dtype=torch.long)
    if not len(allowed):
        raise ValueError(f"vocab_size {vocab} leaves no token ids >= 3")
    codebooks = getattr(model, "num_codebooks", None)
    if not (isinstance(getattr(model, "lm_heads", None), torch.nn.ModuleList) and _is_int(codebooks)):
        codebooks = 1
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(allowed), (batch, codebooks, length), generator=generator)
    ids = allowed[picks].to(next(model.parameters()).device)
    if codebooks == 1:
        return {"input_ids": ids[:, 0], "labels": ids[:, 0].clone()}
    return {"input_ids": ids.reshape(batch * codebooks, length), "labels": ids.transpose(1, 2).contiguous()}
