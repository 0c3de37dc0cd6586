"""Per-branch FLOP counting with ``torch.utils.flop_counter``.

Counting on a real forward at the actual input shape keeps attention's sequence-length
term right (the paper's code hard-codes one length, or adds where it should multiply).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["flop_counter", "sdpa_forward_flops"]


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
    return FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_ops())
