"""The paper code's detach-style mechanism, kept as an independent reference.

The paper's code runs a dropped branch normally and returns ``output.detach()``. It gives
the same gradients as dropbp's no-grad forward but builds and saves the branch's autograd
graph only to discard it. Tests check dropbp's gradients against it; the benchmark
compares their speed and memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["detach_branches"]


def _detach(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):  # (output, weights) tuples, GPT-1's lists, Reformer's namedtuples
        items = [o.detach() if isinstance(o, torch.Tensor) else o for o in output]
        if hasattr(output, "_make"):
            return type(output)._make(items)
        return items if isinstance(output, list) else tuple(items)
    return output


@contextlib.contextmanager
def detach_branches(modules: Sequence[nn.Module], mask: Sequence[bool]) -> Iterator[None]:
    """Within this block, the outputs of modules whose mask entry is True are detached.

    Args:
        modules: Branch modules.
        mask: One bool per module; True detaches that module's output.
    """
    if len(modules) != len(mask):
        raise ValueError(f"mask has {len(mask)} entries but there are {len(modules)} modules")
    handles = [m.register_forward_hook(lambda _m, _a, out: _detach(out)) for m, drop in zip(modules, mask) if drop]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
