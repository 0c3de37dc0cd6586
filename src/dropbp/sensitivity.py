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
from typing import Literal

import torch

__all__ = ["Metric", "exact_sensitivity", "naive_sensitivity", "score"]

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
    branch_outputs: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    metric: Metric = "grad_diff",
    before_backward: Callable[[], None] | None = None,
) -> list[float]:
    """Exact sensitivities from one forward graph.

    Args:
        loss: Scalar loss of a forward in which no branch was dropped.
        branch_outputs: The tensor each branch added to the residual stream in that forward
            (``None`` for a branch that did not run or does not require grad).
        params: Trainable parameters.
        metric: See :func:`score`.
        before_backward: Called before each of the backward passes (FSDP2 re-gathers its
            parameters there).

    Returns:
        One sensitivity per branch. A branch whose output does not reach the loss gets 0.

    Raises:
        ValueError: If the loss is not a scalar that requires grad, or no gradient from it
            reaches ``params``.
    """
    if loss.dim() != 0 or not loss.requires_grad:
        raise ValueError("the closure must return a scalar loss that requires grad (run it in training mode)")
    live = [i for i, out in enumerate(branch_outputs) if out is not None and out.requires_grad]
    inputs = list(params) + [branch_outputs[i] for i in live]
    prepare = before_backward or (lambda: None)
    prepare()
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    if all(g is None for g in grads[: len(params)]):
        raise ValueError(
            "no gradient reaches the trainable parameters from this loss (are they the ones the forward "
            "uses? sharded or replaced parameters are not); every sensitivity would be 0"
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
            branch_outputs[i], params, grad_outputs=g_out, retain_graph=True, allow_unused=True
        )
        result[i] = score(full, _as_list(diff, params), metric)
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
        loss = loss_with_mask(mask)
        if not loss.requires_grad:
            return [torch.zeros_like(p) for p in params]
        return _as_list(torch.autograd.grad(loss, params, allow_unused=True), params)

    full = gradient([False] * num_branches)
    result = []
    for i in range(num_branches):
        mask = [False] * num_branches
        mask[i] = True
        dropped = gradient(mask)
        result.append(score(full, [g - d for g, d in zip(full, dropped)], metric))
    return result
