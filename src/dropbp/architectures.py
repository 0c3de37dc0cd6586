"""Which modules of a model are its residual branches.

Architecture knowledge lives in one data table: ``model_type`` (from a Hugging Face
config) to fnmatch patterns over ``named_modules()`` names. Adding an architecture is one
row here and one test.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

__all__ = ["BRANCH_PATTERNS", "find_model_type", "resolve_branches"]

_LLAMA_STYLE = ("*.layers.*.self_attn", "*.layers.*.mlp")

#: model_type -> fnmatch patterns of the attention and MLP branch modules.
BRANCH_PATTERNS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
}


def find_model_type(model: nn.Module) -> str | None:
    """Return the Hugging Face ``model_type`` of ``model`` or of a wrapped module.

    PEFT and other wrappers hold the transformers model as a submodule, so the first
    module with a ``config.model_type`` wins.
    """
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(model_type, str):
            return model_type
    return None


def _match(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    return [
        name
        for name, _ in model.named_modules()
        if name and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]


def _check_not_nested(names: list[str]) -> None:
    for outer in names:
        for inner in names:
            if inner != outer and inner.startswith(outer + "."):
                raise ValueError(
                    f"branch {inner!r} is nested inside branch {outer!r}; "
                    "pass branches= patterns that select only the outermost residual branch modules"
                )


def resolve_branches(model: nn.Module, branches: Sequence[str] | None = None) -> list[str]:
    """Find the qualified names of the residual-branch modules of ``model``.

    Args:
        model: The model DropBP is applied to.
        branches: fnmatch patterns over ``model.named_modules()`` names. ``None``
            auto-detects from the model's ``config.model_type``.

    Returns:
        Module names in ``named_modules()`` order, which is execution order for the
        architectures in the table.

    Raises:
        ValueError: If the architecture is unknown and no patterns are given, if the
            patterns match nothing, or if a matched module is nested in another.
    """
    if branches is None:
        model_type = find_model_type(model)
        if model_type not in BRANCH_PATTERNS:
            found = f"model_type {model_type!r}" if model_type else "a model without a Hugging Face config"
            raise ValueError(
                f"cannot auto-detect residual branches for {found}; supported: "
                f"{', '.join(sorted(BRANCH_PATTERNS))}. Pass branches=['*.layers.*.attn', '*.layers.*.mlp'] "
                "with fnmatch patterns of your attention and MLP module names"
            )
        patterns: Sequence[str] = BRANCH_PATTERNS[model_type]
    else:
        if isinstance(branches, str):
            branches = [branches]
        patterns = list(branches)
        if not patterns:
            raise ValueError("branches= is empty; pass at least one fnmatch pattern, e.g. '*.layers.*.mlp'")
    names = _match(model, patterns)
    if not names:
        raise ValueError(
            f"branch patterns {list(patterns)} match no module; print [n for n, _ in model.named_modules()] "
            "and pass fnmatch patterns of the attention and MLP modules"
        )
    _check_not_nested(names)
    return names
