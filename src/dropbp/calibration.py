"""Measuring sensitivity on a model: the forced-mask passes, the captured branch outputs, the blocks.

The maths is :mod:`dropbp.sensitivity`'s; this module runs it on a model through the routing
(:class:`~dropbp.forwards.Forwards`): every forward of the closure runs with a forced mask, so the
mask stream does not move, and the branch outputs of the unmasked pass are captured for the
partial backwards. Behind :meth:`dropbp.DropBPHandle.sensitivity` and ``dropbp check``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from dropbp.architectures import find_config
from dropbp.branches import Branch
from dropbp.checkpointing import non_reentrant_checkpointing
from dropbp.distributed import average_over_ranks, fsdp_modules, gathered
from dropbp.errors import FSDP1_SENSITIVITY_REFUSED, ZERO3_SENSITIVITY_REFUSED, DropBPError
from dropbp.forwards import Forwards
from dropbp.sensitivity import Block, Metric, exact_sensitivity, gradient, naive_sensitivity
from dropbp.tensors import first_input, first_tensor
from dropbp.zero import is_zero3_model

__all__ = ["NO_TRAINING_FORWARD", "block_modules", "measure_sensitivity", "unmeasurable_loss"]


def block_modules(model: nn.Module, branches: Sequence[Branch]) -> list[tuple[nn.Module, list[int]]] | None:
    """The modules that hold the branches (each branch's ancestor in a ``ModuleList``), or None.

    None where a branch has no such ancestor, or is itself one (its block would not carry
    the residual stream), or under gradient checkpointing (a recompute inside a batched
    backward is not worth the risk; the branches are measured one by one there).
    """
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return None
    parent = {id(child): module for module in model.modules() for child in module.children()}
    branch_modules = {id(m) for b in branches for m in b.modules}
    blocks: dict[int, tuple[nn.Module, list[int]]] = {}
    for index, branch in enumerate(branches):
        module = branch.module
        while id(module) in parent and not isinstance(parent[id(module)], nn.ModuleList):
            module = parent[id(module)]
        if id(module) not in parent or id(module) in branch_modules:
            return None
        blocks.setdefault(id(module), (module, []))[1].append(index)
    return list(blocks.values())


@contextlib.contextmanager
def recording_block_inputs(
    blocks: list[tuple[nn.Module, list[int]]] | None, params: Sequence[torch.Tensor]
) -> Iterator[Callable[[], list[Block] | None]]:
    """Record each block's input during one forward; yields a getter of the :class:`Block` list.

    The getter gives None unless every block ran exactly once and each one after the first
    was called with the tensor the previous one returned.
    """
    if not blocks:
        yield lambda: None
        return
    calls: list[tuple[int, torch.Tensor | None, torch.Tensor | None]] = []
    entered: dict[int, torch.Tensor | None] = {}

    def before(k: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            entered[k] = first_input(args, kwargs)
        return hook

    def after(k: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            calls.append((k, entered.pop(k, None), first_tensor(output)))
        return hook

    removers = []
    for k, (module, _) in enumerate(blocks):
        removers.append(module.register_forward_pre_hook(before(k), with_kwargs=True))
        removers.append(module.register_forward_hook(after(k)))

    trainable = {id(p) for p in params}

    def result() -> list[Block] | None:
        if sorted(k for k, _, _ in calls) != list(range(len(blocks))) or any(x is None for _, x, _ in calls):
            return None
        if any(calls[n + 1][1] is not calls[n][2] for n in range(len(calls) - 1)):
            return None
        return [Block(x, [p for p in blocks[k][0].parameters() if id(p) in trainable], blocks[k][1])
                for k, x, _ in calls]

    try:
        yield result
    finally:
        for remover in removers:
            remover.remove()


def unmeasurable_loss(model: nn.Module) -> str | None:
    """Why the fast measurement would miss part of the model's loss, or None.

    An MoE model with ``output_router_logits`` adds an auxiliary loss on the router logits,
    which transformers records with hooks inside the MoE branch: that path leaves the branch
    without passing its output, so the partial backward from the output misses it (found by
    ``dropbp check``'s sensitivity row, about 60-90% off on tiny Mixtral and Qwen2-MoE).
    """
    config = find_config(model)
    if getattr(config, "output_router_logits", False) and getattr(config, "router_aux_loss_coef", 1.0):
        return ("the fast sensitivity measurement misses the MoE router's auxiliary loss (output_router_logits=True); "
                "measure with output_router_logits=False, use method='naive', or keep the rates uniform "
                "(sensitivity_at=None)")
    return None


NO_TRAINING_FORWARD = (
    "the sensitivity closure ran no training forward of the model (it is in eval mode, or gradients are off), "
    "so no branch could be measured; call model.train() and return a loss that requires grad"
)


def measure_sensitivity(
    routing: Forwards, closure: Callable[[], torch.Tensor], metric: Metric = "grad_diff", method: str = "fast"
) -> list[float]:
    """Run the measurement behind :meth:`dropbp.DropBPHandle.sensitivity` (see there).

    Every forward of the closure runs with a forced mask, so the mask stream does not move;
    dropout draws are the same in every pass (the RNG is forked and rewound).

    Args:
        routing: The routing of the model's hooks (its model, branch table and mask stream).
        closure: One training forward on a fixed batch, returning the loss.
        metric: The sensitivity metric.
        method: ``"fast"`` or ``"naive"``.
    """
    model = routing.model
    fsdp1, fsdp2 = fsdp_modules(model)
    if fsdp1:
        raise DropBPError(FSDP1_SENSITIVITY_REFUSED)
    if is_zero3_model(model):
        raise DropBPError(ZERO3_SENSITIVITY_REFUSED)
    if fsdp2 and method != "fast":
        raise ValueError("under FSDP2 only method='fast' measures sensitivity; the naive check needs whole parameters")
    if method not in ("fast", "naive"):
        raise ValueError(f"method must be 'fast' or 'naive', got {method!r}")
    problem = unmeasurable_loss(model) if method == "fast" else None
    if problem is not None:
        raise DropBPError(problem)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters that require grad; nothing to measure")
    n = len(routing.table)
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), non_reentrant_checkpointing(model):
        rng = torch.get_rng_state()
        cuda_rng = [torch.cuda.get_rng_state(d) for d in devices]

        def loss_with_mask(mask: list[bool]) -> torch.Tensor:
            torch.set_rng_state(rng)
            for d, state in zip(devices, cuda_rng):
                torch.cuda.set_rng_state(state, d)
            before = routing.trained_forwards
            with routing.stream.forced(mask):
                loss = closure()
            if routing.trained_forwards == before:
                raise ValueError(NO_TRAINING_FORWARD)
            return loss

        def dropped_gradient(index: int) -> list[torch.Tensor]:
            mask = [False] * n
            mask[index] = True
            return gradient(loss_with_mask(mask), params)

        if method == "naive":
            result = naive_sensitivity(loss_with_mask, n, params, metric)
        else:
            blocks_of = None if fsdp2 else block_modules(model, routing.table.branches)
            with routing.capturing() as captured, recording_block_inputs(blocks_of, params) as recorded:
                loss = loss_with_mask([False] * n)
                contexts = captured()  # every training forward of the closure (R-Drop, chosen/rejected, ...)
                outputs = [[call for c in contexts for call in (c.capture or {}).get(i, [])] for i in range(n)]
                blocks = recorded() if len(contexts) == 1 else None
            with gathered(fsdp2) as gather:
                if fsdp2:  # the graph's leaves are the unsharded parameters, held only while gathered
                    params = [p for p in model.parameters() if p.requires_grad]
                result = exact_sensitivity(loss, outputs, params, metric, before_backward=gather,
                                           dropped_gradient=dropped_gradient, blocks=blocks)
            del loss, outputs, blocks
    return average_over_ranks(result, params[0].device)
