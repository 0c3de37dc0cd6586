"""Where a branch's tensors are in its call and its output: positional or keyword, tensor, tuple, dict."""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["first_input", "first_tensor", "replace_first_tensor", "replace_items"]


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a branch adds to the residual stream: itself, or the first of a tuple or dict.

    Hugging Face attention returns ``(output, weights)`` and MoE blocks
    ``(output, router_logits)``; the first element is the residual contribution.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):  # transformers' ModelOutput (its first field is set), or a plain dict
        value = tuple(value.values())
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def first_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first tensor argument of a call, positional before keyword (``hidden_states``)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def replace_first_tensor(value: Any, tensor: torch.Tensor) -> Any:
    """Return ``value`` with the tensor that :func:`first_tensor` finds replaced."""
    if isinstance(value, torch.Tensor):
        return tensor
    if isinstance(value, dict):
        replaced = copy.copy(value)
        replaced[next(iter(value))] = tensor
        return replaced
    return replace_items(value, [tensor, *value[1:]])


def replace_items(value: tuple | list, items: list) -> tuple | list:
    """A tuple or list of the same kind as ``value`` holding ``items``."""
    if hasattr(value, "_make"):  # a namedtuple (Reformer's AttentionOutput): keep its fields
        return type(value)._make(items)
    return type(value)(items) if isinstance(value, list) else tuple(items)
