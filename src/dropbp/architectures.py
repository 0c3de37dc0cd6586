"""Which modules of a model are its residual branches.

Architecture knowledge lives in one data table: ``model_type`` (from a Hugging Face
config) to fnmatch patterns over ``named_modules()`` names. Adding an architecture is one
row here and one test. Models outside the table go through a generic fallback: the
decoder layer list, plus layer children that are clearly attention or MLP.

A pattern ``"<glob>..<sibling>"`` selects a *span*: from the module the glob matches to its
sibling named ``<sibling>``, for architectures whose MLP is not one module (OPT's
``fc1 -> activation -> fc2``), and for those whose attention or MLP module adds the residual
inside its own ``forward`` (Bloom, MPT): the span ends at the last projection, before the add,
so the residual stream keeps its gradient when the branch is dropped.

The generic fallback never picks a module whose ``forward`` takes the residual as an
argument; :func:`dropbp.check` verifies the rest on a tiny copy of the model.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "BRANCH_PATTERNS", "BranchSpec", "branch_source", "find_config", "find_model_type", "residual_argument",
    "resolve_branches",
]

_LLAMA_STYLE = ("*.layers.*.self_attn", "*.layers.*.mlp")

#: model_type -> fnmatch patterns of the attention and MLP branch modules.
BRANCH_PATTERNS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    # The sparse MoE block is one branch; older transformers call it block_sparse_moe.
    "mixtral": (*_LLAMA_STYLE, "*.layers.*.block_sparse_moe"),
    "qwen2": _LLAMA_STYLE,
    "qwen2_moe": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "qwen3_moe": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    # Gemma 2/3 normalise each branch's output (post_*_layernorm) outside the branch module:
    # those norms keep getting weight gradients when the branch is dropped.
    "gemma2": _LLAMA_STYLE,
    "gemma3_text": _LLAMA_STYLE,
    "phi3": _LLAMA_STYLE,
    "starcoder2": _LLAMA_STYLE,
    "olmo2": _LLAMA_STYLE,
    "granite": _LLAMA_STYLE,
    "gpt2": ("*.h.*.attn", "*.h.*.mlp"),
    # Parallel residual (x + attn(ln1 x) + mlp(ln2 x)): both branches read the same x.
    "gpt_neox": ("*.layers.*.attention", "*.layers.*.mlp"),
    "falcon": ("*.h.*.self_attention", "*.h.*.mlp"),
    "opt": ("*.layers.*.self_attn", "*.layers.*.fc1..fc2"),
    # BloomAttention and BloomMLP take the residual and add it inside their forward: the
    # branches are spans that end at the output projection, before that add.
    "bloom": ("*.h.*.self_attention.query_key_value..dense", "*.h.*.mlp.dense_h_to_4h..dense_4h_to_h"),
    # MptMLP adds the residual inside (MptAttention does not).
    "mpt": ("*.blocks.*.attn", "*.blocks.*.ffn.up_proj..down_proj"),
}

_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_MLP = re.compile(r"mlp|ffn|feed_?forward|moe|experts", re.IGNORECASE)
_NORM = re.compile(r"norm|ln", re.IGNORECASE)
# Cross-attention runs only with encoder states, which a decoder used as a causal LM never gets.
_CROSS = re.compile(r"cross|encoder_attn", re.IGNORECASE)
# Modules that carry the residual stream itself (hyper-connections, residual scales), whatever
# branch they are named after: dropping them would cut the stream. "hc" is HY-V4's hyper-connection
# (`attn_hc`, `ffn_hc`), taken as a whole word only.
_STREAM = re.compile(r"residual|connection|skip|(?:^|_)hc(?:_|$)", re.IGNORECASE)


@dataclass(frozen=True)
class BranchSpec:
    """A resolved branch: the module its forward starts in and the one it ends in.

    ``start == end`` for an ordinary branch module; a span covers the siblings between.
    """

    name: str
    start: str
    end: str


def find_config(model: nn.Module) -> Any:
    """Return the Hugging Face config of ``model`` or of a wrapped module, or None.

    PEFT and other wrappers hold the transformers model as a submodule, so the first
    module whose ``config`` has a ``model_type`` wins.
    """
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(getattr(config, "model_type", None), str):
            return config
    return None


def find_model_type(model: nn.Module) -> str | None:
    """Return the Hugging Face ``model_type`` of ``model`` or of a wrapped module (see :func:`find_config`)."""
    config = find_config(model)
    return None if config is None else config.model_type


# Module names that wrappers insert (FSDP1, checkpoint_wrapper, torch.compile): patterns
# and branch names see through them, so saved DropBP state fits wrapped and plain models.
_WRAPPER_NAMES = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def _unwrapped_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


def _match(model: nn.Module, patterns: Sequence[str]) -> list[BranchSpec]:
    modules = dict(model.named_modules())
    specs = []
    for name in modules:
        clean = _unwrapped_name(name)
        if not clean or name.rpartition(".")[2] in _WRAPPER_NAMES:
            continue
        for pattern in patterns:
            glob, _, sibling = pattern.partition("..")
            if not fnmatch.fnmatchcase(clean, glob):
                continue
            if not sibling:
                specs.append(BranchSpec(clean, name, name))
                break
            parent = name.rpartition(".")[0]
            end = f"{parent}.{sibling}" if parent else sibling
            if end not in modules:
                raise ValueError(f"span pattern {pattern!r}: {clean!r} has no sibling module {sibling!r}")
            specs.append(BranchSpec(f"{clean}..{sibling}", name, end))
            break
    return specs


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of same-class blocks holding the most parameters: the layer stack."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) != 1:
                continue
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    return best


_RESIDUAL_ARGUMENT = re.compile(r"residual|input_tensor|shortcut", re.IGNORECASE)


def residual_argument(module: nn.Module) -> str | None:
    """The name of a ``forward`` parameter through which ``module`` receives the residual, if any.

    Such a module adds the residual inside (Bloom's ``forward(hidden_states, residual)``,
    BERT's ``SelfOutput.forward(hidden_states, input_tensor)``): run without grad, it would
    cut the residual stream, so it is never a branch as a whole.
    """
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # a builtin or C++ forward: nothing to read
        return None
    return next((name for name in parameters if _RESIDUAL_ARGUMENT.search(name)), None)


def _refuse_residual_inside(model: nn.Module, specs: list[BranchSpec]) -> None:
    """Refuse branches that add the residual inside: by their signature, or whole decoder layers."""
    modules = dict(model.named_modules())
    layers = decoder_layers(model) if find_model_type(model) is not None else None
    layer_ids = {id(layer) for layer in layers[1]} if layers is not None else set()
    for spec in specs:
        if id(modules[spec.start]) in layer_ids:
            raise ValueError(
                f"cannot use {spec.name!r} as a branch: it is a whole decoder layer, whose forward adds the residual, "
                f"so dropping it would cut the gradient to every layer below; select its attention and MLP modules, "
                f"e.g. '{layers[0]}.*.self_attn', and run dropbp.check(model, branches=...)"
            )
        start = modules[spec.start]
        inside = [start] if spec.start != spec.end else list(start.modules())
        for module in inside:
            argument = residual_argument(module)
            if argument is None:
                continue
            where = "its forward" if module is start else f"its submodule {type(module).__name__}"
            raise ValueError(
                f"cannot pick {spec.name!r} as a branch: {where} takes the residual ({argument!r}) and adds it "
                f"inside, so dropping it would cut the residual stream; pass branches= patterns of modules or spans "
                f"that end before the add, e.g. '{spec.name}.<first_proj>..<last_proj>', and run "
                "dropbp.check(model, branches=...)"
            )


def _fallback(model: nn.Module) -> list[BranchSpec]:
    found = decoder_layers(model)
    if found is None:
        return []
    prefix, layers = found
    specs = []
    for index, layer in enumerate(layers):
        path = f"{prefix}.{index}" if prefix else str(index)
        children = dict(layer.named_children())
        while len(children) == 1 and next(iter(children)) in _WRAPPER_NAMES:
            wrapper, inner = next(iter(children.items()))
            path, children = f"{path}.{wrapper}", dict(inner.named_children())
        for child, module in children.items():
            if _NORM.search(child) or _CROSS.search(child) or _STREAM.search(child):
                continue
            if not any(True for _ in module.parameters()):
                continue
            if _ATTENTION.search(child) or _MLP.search(child):
                name = f"{path}.{child}"
                specs.append(BranchSpec(_unwrapped_name(name), name, name))
    return specs


def _check_not_nested(specs: list[BranchSpec]) -> None:
    for outer in specs:
        for inner in specs:
            if inner is not outer and (inner.start + ".").startswith(outer.start + "."):
                raise ValueError(
                    f"branch {inner.name!r} is nested inside branch {outer.name!r}; "
                    "pass branches= patterns that select only the outermost residual branch modules"
                )


def branch_source(model: nn.Module, branches: Sequence[str] | str | None = None) -> str:
    """Where :func:`resolve_branches` takes the branches from.

    Returns:
        ``"patterns"`` (the caller's ``branches=``), ``"table"`` (a :data:`BRANCH_PATTERNS`
        row) or ``"fallback"`` (the generic rule, which :func:`dropbp.verify.require_sound_branches`
        verifies on the first training batch).
    """
    if branches is not None:
        return "patterns"
    return "table" if find_model_type(model) in BRANCH_PATTERNS else "fallback"


def resolve_branches(model: nn.Module, branches: Sequence[str] | str | None = None) -> list[BranchSpec]:
    """Find the residual branches of ``model``.

    Args:
        model: The model DropBP is applied to.
        branches: fnmatch patterns over ``model.named_modules()`` names (``"glob..sibling"``
            for a span). ``None`` looks the model's ``config.model_type`` up in
            :data:`BRANCH_PATTERNS`, then, for other Hugging Face models, tries the generic
            fallback; a plain ``nn.Module`` needs patterns.

    Returns:
        Branch specs in ``named_modules()`` order, which is execution order for the
        architectures in the table.

    Raises:
        ValueError: If nothing is found for an unknown architecture, if the patterns
            match nothing, if a matched module is nested in another, or if a matched
            module adds the residual inside (it takes the residual as an argument, or it
            is a whole decoder layer of a Hugging Face model).
    """
    if branches is None:
        model_type = find_model_type(model)
        if model_type in BRANCH_PATTERNS:
            specs = _match(model, BRANCH_PATTERNS[model_type])
        elif model_type is not None:
            specs = _fallback(model)
        else:  # a plain nn.Module: its names are the user's own, so guessing would be unsafe
            specs = []
        if not specs:
            found = f"model_type {model_type!r}" if model_type else "a model without a Hugging Face config"
            raise ValueError(
                f"cannot auto-detect residual branches for {found}; supported: "
                f"{', '.join(sorted(BRANCH_PATTERNS))}. Pass branches=['*.layers.*.attn', '*.layers.*.mlp'] "
                "with fnmatch patterns of your attention and MLP module names"
            )
    else:
        patterns = [branches] if isinstance(branches, str) else list(branches)
        if not patterns:
            raise ValueError("branches= is empty; pass at least one fnmatch pattern, e.g. '*.layers.*.mlp'")
        specs = _match(model, patterns)
        if not specs:
            raise ValueError(
                f"branch patterns {patterns} match no module; print [n for n, _ in model.named_modules()] "
                "and pass fnmatch patterns of the attention and MLP modules"
            )
    _refuse_residual_inside(model, specs)
    _check_not_nested(specs)
    return specs
