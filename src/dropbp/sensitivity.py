"""Branch sensitivity ``S_l = ||G - G_{-l}||^2`` (exact fast recipe and naive reference).

``G`` is the gradient of all trainable parameters with nothing dropped and ``G_{-l}`` the
gradient with only branch ``l`` dropped, on the same batch. Dropping ``l`` changes nothing
above it, so the gradient ``g_l`` that reaches its output is the same in both, and removing
the path through ``f_l`` removes exactly::

    G - G_{-l} = grad_theta < f_l(x_l), g_l >     (g_l held constant)

One forward, one backward that captures every ``g_l``, and one partial backward per branch
give the exact values, instead of ``L + 1`` forward/backward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch

from dropbp.checkpointing import non_reentrant_checkpointing
from dropbp.distributed import FSDP1_SENSITIVITY_REFUSED, average_over_ranks, fsdp_modules, gathered

if TYPE_CHECKING:
    from dropbp.handle import DropBPHandle

__all__ = ["Metric", "exact_sensitivity", "measure_sensitivity", "naive_sensitivity", "score"]

Metric = Literal["grad_diff", "grad_norm_diff"]


def _as_list(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def score(full: Sequence[torch.Tensor], difference: Sequence[torch.Tensor], metric: Metric) -> float:
    """Turn ``G`` and ``G - G_{-l}`` into one sensitivity number.

    Args:
        full: Per-parameter gradients ``G``.
        difference: Per-parameter ``G - G_{-l}``.
        metric: ``"grad_diff"`` gives ``||G - G_{-l}||^2``. ``"grad_norm_diff"`` gives the
            paper code's ``sum_p (||G_p|| - ||G_{-l,p}||)^2``.

    Returns:
        The sensitivity, accumulated in float64.

    Raises:
        ValueError: On an unknown metric.
    """
    if metric == "grad_diff":
        return float(sum(d.double().pow(2).sum() for d in difference))
    if metric == "grad_norm_diff":
        total = 0.0
        for g, d in zip(full, difference):
            g64 = g.double()
            total += float((g64.norm() - (g64 - d.double()).norm()) ** 2)
        return total
    raise ValueError(f"metric must be 'grad_diff' or 'grad_norm_diff', got {metric!r}")


def exact_sensitivity(
    loss: torch.Tensor,
    branch_outputs: Sequence[Sequence[torch.Tensor]],
    params: Sequence[torch.Tensor],
    metric: Metric = "grad_diff",
    before_backward: Callable[[], None] | None = None,
    dropped_gradient: Callable[[int], list[torch.Tensor]] | None = None,
) -> list[float]:
    """Exact sensitivities from one forward graph.

    Args:
        loss: Scalar loss of a forward in which no branch was dropped.
        branch_outputs: Per branch, the tensor it added to the residual stream at each of
            its calls in that forward (empty for a branch that did not run).
        params: Trainable parameters.
        metric: See :func:`score`.
        before_backward: Called before each of the backward passes (FSDP2 re-gathers its
            parameters there).
        dropped_gradient: For a branch called more than once, ``G_{-l}`` by a forward and
            backward with only that branch dropped. The one-partial-backward identity holds
            for one call only: a path through two calls of the branch would count twice.

    Returns:
        One sensitivity per branch. A branch whose output does not reach the loss gets 0.

    Raises:
        ValueError: If the loss is not a scalar that requires grad, no gradient from it
            reaches ``params``, or a branch ran more than once and ``dropped_gradient`` is None.
    """
    if loss.dim() != 0 or not loss.requires_grad:
        raise ValueError("the closure must return a scalar loss that requires grad (run it in training mode)")
    repeated = [i for i, outs in enumerate(branch_outputs) if len(outs) > 1]
    if repeated and dropped_gradient is None:
        raise ValueError(f"branch {repeated[0]} ran {len(branch_outputs[repeated[0]])} times in one forward; "
                         "pass dropped_gradient to measure it")
    live = [i for i, outs in enumerate(branch_outputs) if len(outs) == 1 and outs[0].requires_grad]
    inputs = list(params) + [branch_outputs[i][0] for i in live]
    prepare = before_backward or (lambda: None)
    prepare()
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    if all(g is None for g in grads[: len(params)]):
        raise ValueError(
            "no gradient reaches the trainable parameters from the closure's loss; check that the closure "
            "runs the model this handle is attached to, in training mode, with the parameters it trains"
        )
    full = _as_list(grads[: len(params)], params)
    incoming = dict(zip(live, grads[len(params):]))

    result = [0.0] * len(branch_outputs)
    for i in live:
        g_out = incoming[i]
        if g_out is None:
            continue
        prepare()
        diff = torch.autograd.grad(
            branch_outputs[i][0], params, grad_outputs=g_out, retain_graph=True, allow_unused=True
        )
        result[i] = score(full, _as_list(diff, params), metric)
    for i in repeated:
        dropped = dropped_gradient(i)  # type: ignore[misc]
        result[i] = score(full, [f - d for f, d in zip(full, dropped)], metric)
    return result


def naive_sensitivity(
    loss_with_mask: Callable[[list[bool]], torch.Tensor],
    num_branches: int,
    params: Sequence[torch.Tensor],
    metric: Metric = "grad_diff",
) -> list[float]:
    """Reference sensitivities from the definition: ``L + 1`` forward/backward passes.

    Args:
        loss_with_mask: Runs one forward with the given drop mask and returns the loss.
            Every call must see the same batch (and the same dropout draws).
        num_branches: ``L``.
        params: Trainable parameters.
        metric: See :func:`score`.

    Returns:
        One sensitivity per branch.
    """

    def gradient(mask: list[bool]) -> list[torch.Tensor]:
        return _gradient(loss_with_mask(mask), params)

    full = gradient([False] * num_branches)
    result = []
    for i in range(num_branches):
        mask = [False] * num_branches
        mask[i] = True
        dropped = gradient(mask)
        result.append(score(full, [g - d for g, d in zip(full, dropped)], metric))
    return result


def _gradient(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    return _as_list(torch.autograd.grad(loss, params, allow_unused=True), params)


def measure_sensitivity(
    handle: DropBPHandle, closure: Callable[[], torch.Tensor], metric: Metric = "grad_diff", method: str = "fast"
) -> list[float]:
    """Run the measurement behind :meth:`dropbp.DropBPHandle.sensitivity` (see there).

    Every forward of the closure runs with a forced mask, so the mask stream does not move;
    dropout draws are the same in every pass (the RNG is forked and rewound).
    """
    model = handle.model
    fsdp1, fsdp2 = fsdp_modules(model)
    if fsdp1:
        raise ValueError(FSDP1_SENSITIVITY_REFUSED)
    if fsdp2 and method != "fast":
        raise ValueError("under FSDP2 only method='fast' measures sensitivity; the naive check needs whole parameters")
    if method not in ("fast", "naive"):
        raise ValueError(f"method must be 'fast' or 'naive', got {method!r}")
    params = handle.trainable_parameters()
    if not params:
        raise ValueError("the model has no parameters that require grad; nothing to measure")
    n = len(handle.branches)
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), non_reentrant_checkpointing(model):
        rng = torch.get_rng_state()
        cuda_rng = [torch.cuda.get_rng_state(d) for d in devices]

        def loss_with_mask(mask: list[bool]) -> torch.Tensor:
            torch.set_rng_state(rng)
            for d, state in zip(devices, cuda_rng):
                torch.cuda.set_rng_state(state, d)
            with handle._forced(mask):
                return closure()

        def dropped_gradient(index: int) -> list[torch.Tensor]:
            mask = [False] * n
            mask[index] = True
            return _gradient(loss_with_mask(mask), params)

        if method == "naive":
            result = naive_sensitivity(loss_with_mask, n, params, metric)
        else:
            with handle._forwards.capturing() as captured:
                loss = loss_with_mask([False] * n)
                context = captured()
                outputs = [list((context.capture or {}).get(i, [])) if context else [] for i in range(n)]
            with gathered(fsdp2) as gather:
                if fsdp2:  # the graph's leaves are the unsharded parameters, held only while gathered
                    params = handle.trainable_parameters()
                result = exact_sensitivity(loss, outputs, params, metric, before_backward=gather,
                                           dropped_gradient=dropped_gradient)
            del loss, outputs
    return average_over_ranks(result, params[0].device)
