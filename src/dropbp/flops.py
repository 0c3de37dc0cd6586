"""Per-branch FLOP counting with ``torch.utils.flop_counter``.

Counting on a real forward at the actual input shape keeps attention's sequence-length
term right (the paper's code hard-codes one length, or adds where it should multiply).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopMeter", "flop_counter", "sdpa_forward_flops", "shape_key"]

# Padded lengths vary per batch; a few hundred shapes cover any realistic run.
_MAX_CACHED_SHAPES = 512


def sdpa_forward_flops(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one scaled-dot-product attention forward (``QK^T`` and ``AV`` matmuls).

    Handles grouped-query attention, where the key and value have fewer heads than the
    query: every query head still does a full ``Tq x Tk`` product. As in torch's own
    formula, the causal mask is not discounted.
    """
    *batch, heads, q_len, qk_dim = query_shape
    k_len = key_shape[-2]
    v_dim = value_shape[-1]
    n = heads * q_len * k_len
    for b in batch:
        n *= b
    return 2 * n * qk_dim + 2 * n * v_dim


def _cpu_sdpa_ops() -> dict[Any, Any]:
    # torch's registry covers the CUDA kernels but not the CPU flash kernel that
    # F.scaled_dot_product_attention dispatches to on CPU (also with enable_gqa=True).
    ops = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        ops[op] = sdpa_forward_flops
    return ops


def flop_counter() -> FlopCounterMode:
    """Return a silent ``FlopCounterMode`` that also counts CPU attention kernels.

    Returns:
        A context manager; read ``get_total_flops()`` after leaving it.
    """
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_ops())
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _TotalOnly()
    return counter


class _TotalOnly:
    """Stands in for FlopCounterMode's per-module tracker: every FLOP goes to the total.

    The tracker hooks every module call and registers gradient hooks on its inputs that
    require grad. Inside a dropped branch (run under ``no_grad``) a view of a grad-requiring
    tensor, such as a MoE router's ``hidden_states.view(-1, dim)``, requires grad but has no
    ``grad_fn``, and registering the hook fails ("Expected gradient function to be set").
    DropBP reads only the total, so per-module attribution is not needed.
    """

    parents = frozenset({"Global"})
    is_bw = False

    def __enter__(self) -> _TotalOnly:
        return self

    def __exit__(self, *args: Any) -> None:
        return None


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                yield item


def shape_key(args: tuple, kwargs: dict) -> tuple:
    """Shapes of the tensor inputs (one level into tuples): FLOPs change only with these."""
    key = [tuple(t.shape) for a in args for t in _tensors(a)]
    key += [(k, tuple(t.shape)) for k, v in kwargs.items() for t in _tensors(v)]
    return tuple(key)


class FlopMeter:
    """Forward FLOPs per branch and input shape, counted once per shape on training forwards.

    Counting runs the forward under a Python dispatch mode, which is slow, so it happens on
    the first training call at each new input shape only. Eval, ``no_grad`` and
    ``generate`` never reach the meter: their shapes (one token per decode step) would
    otherwise cost a count each and replace the training FLOPs the allocation needs.

    Args:
        num_branches: How many branches are metered.
    """

    def __init__(self, num_branches: int):
        self.flops: list[int | None] = [None] * num_branches
        self._by_shape: list[dict[tuple, int]] = [{} for _ in range(num_branches)]

    def start(self, index: int, args: tuple, kwargs: dict) -> tuple[FlopCounterMode, tuple] | None:
        """Before a training call of branch ``index``: a count to :meth:`stop`, or None if known."""
        key = shape_key(args, kwargs)
        known = self._by_shape[index].get(key)
        if known is not None:
            self.flops[index] = known
            return None
        counter = flop_counter()
        counter.__enter__()
        return counter, key

    def stop(self, index: int, count: tuple[FlopCounterMode, tuple], completed: bool) -> None:
        """After the call: close the count, and keep it if the forward completed."""
        counter, key = count
        counter.__exit__(None, None, None)
        if not completed:
            return
        cache = self._by_shape[index]
        if len(cache) >= _MAX_CACHED_SHAPES:
            cache.pop(next(iter(cache)))
        cache[key] = self.flops[index] = int(counter.get_total_flops())
