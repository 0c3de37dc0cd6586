"""Branch sensitivity ``S_l = ||G - G_{-l}||^2`` (exact fast recipe and naive reference).

``G`` is the gradient of all trainable parameters with nothing dropped and ``G_{-l}`` the
gradient with only branch ``l`` dropped, on the same batch. Dropping ``l`` changes nothing
above it, so the gradient ``g_l`` that reaches its output is the same in both, and removing
the path through ``f_l`` removes exactly::

    G - G_{-l} = grad_theta < f_l(x_l), g_l >     (g_l held constant)

One forward, one backward that captures every ``g_l``, and one partial backward per branch
give the exact values, instead of ``L + 1`` forward/backward passes.

Those partial backwards all run down the same layers. Where the branches sit in blocks that
chain the residual stream (a decoder layer's input is the previous layer's output), they are
run together instead: walking down the blocks, each block's backward takes one batch of
incoming gradients, one row per branch above it (vmap, ``is_grads_batched``), plus one new row
per branch inside it. The arithmetic is the same; the matrix products are L times taller.
A check on the sum over branches (one extra backward) guards the block structure; where it
fails the branches are measured one by one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["Block", "Metric", "exact_sensitivity", "gradient", "naive_sensitivity", "score"]

Metric = Literal["grad_diff", "grad_norm_diff"]

logger = logging.getLogger(__name__)

# Per batched backward call: the rows' parameter gradients, and the rows' stream gradients. Batching helps
# where one row's matrix products are thin (few tokens); rows of many tokens gain nothing and only add
# memory traffic. On 2 CPU cores with SmolLM2's hidden size 576, one example of 72 tokens measured 1.7x
# faster batched, 4 examples (380 tokens) the same, the whole batch of 8 x 96 tokens 1.1-1.3x slower even
# in calls of 2 rows; so where fewer than MIN_ROWS rows fit in one call (rows of more than about 1 MiB),
# the branches are measured one by one.
BATCH_BYTES = 512 * 2**20
# The batched rows must sum to one ordinary backward's gradient up to float32 rounding: correct block
# structures measured 2.5e-7 to 3.3e-7 (relative, per parameter) on eight tiny architectures, and a side path
# around the blocks that carries 1e-4 of the gradient must fail. In half precision rounding alone exceeds
# such a path, so there the branches are measured one by one.
SUM_RTOL = 1e-5
STREAM_BYTES = 12 * 2**20
MIN_ROWS = 12


@dataclass(frozen=True)
class Block:
    """One block of the residual stream (a decoder layer) in the measured forward.

    Attributes:
        input: The stream tensor the block was called with.
        params: The trainable parameters inside the block.
        branches: Indices of the branches inside the block.
    """

    input: torch.Tensor
    params: Sequence[torch.Tensor]
    branches: Sequence[int]


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
    raise ValueError(_unknown_metric(metric))


def _unknown_metric(metric: object) -> str:
    return f"metric must be 'grad_diff' or 'grad_norm_diff', got {metric!r}"


def exact_sensitivity(
    loss: torch.Tensor,
    branch_outputs: Sequence[Sequence[Sequence[torch.Tensor]]],
    params: Sequence[torch.Tensor],
    metric: Metric = "grad_diff",
    before_backward: Callable[[], None] | None = None,
    dropped_gradient: Callable[[int], list[torch.Tensor]] | None = None,
    blocks: Sequence[Block] | None = None,
) -> list[float]:
    """Exact sensitivities from one forward graph.

    Args:
        loss: Scalar loss of a forward (or several) in which no branch was dropped.
        branch_outputs: Per branch, per call of it while the loss was computed, the
            tensors of that call's output that require grad (the residual contribution,
            and any other tensor it returned: dropping the branch cuts them all). Empty
            for a branch that did not run.
        params: Trainable parameters.
        metric: See :func:`score`.
        before_backward: Called before each of the backward passes (FSDP2 re-gathers its
            parameters there).
        dropped_gradient: For a branch whose calls feed each other (a shared branch applied
            twice along the stream), ``G_{-l}`` by a forward and backward with only that
            branch dropped. One partial backward from all of a branch's calls is exact only
            where no call's output reaches another call (calls in separate forwards, as a
            loss over two forwards makes them): a path through two calls would count twice.
        blocks: The blocks that hold the branches, in execution order, each called once,
            each called with the previous one's output. Given, the partial backwards run
            batched down the blocks (see the module docstring); if the sum over branches
            does not match, or the batched backward fails, they run one by one.

    Returns:
        One sensitivity per branch. A branch whose output does not reach the loss gets 0.

    Raises:
        ValueError: On an unknown metric, if the loss is not a scalar that requires grad, no
            gradient from it reaches ``params``, or a branch's calls feed each other and
            ``dropped_gradient`` is None.
    """
    if metric not in ("grad_diff", "grad_norm_diff"):
        raise ValueError(_unknown_metric(metric))
    if loss.dim() != 0 or not loss.requires_grad:
        raise ValueError("the closure must return a scalar loss that requires grad (run it in training mode)")
    calls = [[[t for t in call if t.requires_grad] for call in outputs] for outputs in branch_outputs]
    calls = [[call for call in outputs if call] for outputs in calls]
    flat = [t for outputs in calls for call in outputs for t in call]
    prepare = before_backward or (lambda: None)
    prepare()
    grads = torch.autograd.grad(loss, list(params) + flat, retain_graph=True, allow_unused=True)
    if all(g is None for g in grads[: len(params)]):
        raise ValueError(
            "no gradient reaches the trainable parameters from the closure's loss; check that the closure "
            "runs the model this handle is attached to, in training mode, with the parameters it trains"
        )
    full = _as_list(grads[: len(params)], params)
    # Per branch: each output tensor that the loss's gradient reaches, with that gradient.
    incoming: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    position = len(params)
    for i, outputs in enumerate(calls):
        for call in outputs:
            for t in call:
                if grads[position] is not None:
                    incoming.setdefault(i, []).append((t, grads[position]))
                position += 1
    chained = [i for i, outputs in enumerate(calls) if i in incoming and _calls_feed_each_other(outputs, prepare)]
    if chained and dropped_gradient is None:
        raise ValueError(f"branch {chained[0]}'s calls feed each other in one forward; "
                         "pass dropped_gradient to measure it")

    single = all(len(pairs) == 1 and len(calls[i]) == 1 for i, pairs in incoming.items())
    if blocks is not None and single:
        try:
            batched = _batched_down_the_blocks(
                full, {i: pairs[0] for i, pairs in incoming.items()}, len(calls), params, blocks, metric, prepare)
        except RuntimeError as error:  # a backward formula vmap cannot batch: measure one by one
            logger.debug("batched sensitivity failed (%s); measuring branch by branch", error)
            batched = None
        if batched is not None:
            return batched

    result = [0.0] * len(branch_outputs)
    for i, pairs in incoming.items():
        if i in chained:
            dropped = dropped_gradient(i)  # type: ignore[misc]
            result[i] = score(full, [f - d for f, d in zip(full, dropped)], metric)
            continue
        prepare()
        diff = torch.autograd.grad([t for t, _ in pairs], params, grad_outputs=[g for _, g in pairs],
                                   retain_graph=True, allow_unused=True)
        result[i] = score(full, _as_list(diff, params), metric)
    return result


def _calls_feed_each_other(calls: Sequence[Sequence[torch.Tensor]], prepare: Callable[[], None]) -> bool:
    """Whether the output of one call of a branch reaches the output of a later call.

    Asking autograd for the gradient of the later outputs with respect to the earlier
    ones runs nothing where no path joins them: it answers None for every one.
    """
    for k in range(1, len(calls)):
        earlier = [t for call in calls[:k] for t in call]
        prepare()
        reached = torch.autograd.grad(list(calls[k]), earlier, [torch.zeros_like(t) for t in calls[k]],
                                      retain_graph=True, allow_unused=True)
        if any(g is not None for g in reached):
            return True
    return False


def _rows_per_call(params: Sequence[torch.Tensor], stream: torch.Tensor) -> int:
    """How many rows one batched backward takes (see ``BATCH_BYTES`` and ``STREAM_BYTES``)."""
    grads = sum(p.numel() * (p.element_size() + 8) for p in params)  # + the float64 copy that scores them
    by_grads = BATCH_BYTES // max(grads, 1)
    by_stream = STREAM_BYTES // max(stream.numel() * stream.element_size(), 1)
    return max(1, min(by_grads, by_stream))


def _batched_down_the_blocks(
    full: list[torch.Tensor],
    incoming: dict[int, tuple[torch.Tensor, torch.Tensor]],
    num_branches: int,
    params: Sequence[torch.Tensor],
    blocks: Sequence[Block],
    metric: Metric,
    prepare: Callable[[], None],
) -> list[float] | None:
    """The partial backwards of :func:`exact_sensitivity`, batched down the blocks.

    Row ``r`` of the batch is branch ``rows[r]``'s partial backward. Entering a block from
    above, the rows are the gradients at the next block's input; the block's own branches
    start new rows at their outputs with ``g_l``. Every parameter gets its per-row gradient
    ``G - G_{-l}`` from the one block it belongs to (parameters outside every block from the
    stretch below the first block), and each row is scored as :func:`score` scores it.

    Returns:
        The sensitivities, or None where the rows are too wide to gain from batching
        (``MIN_ROWS``, ``STREAM_BYTES``) or the blocks do not carry every partial backward:
        the sum of the rows' gradients must equal ``grad < sum_l f_l(x_l), g_l >`` computed
        with one ordinary backward (a path that skips a block's input, or a trainable
        parameter the blocks share, breaks it).
    """
    in_a_block = {i for block in blocks for i in block.branches}
    if any(i not in in_a_block for i in incoming):
        return None
    if any(p.dtype not in (torch.float32, torch.float64) for p in params):
        return None  # the sum check cannot tell a missed path from half-precision rounding
    if blocks and MIN_ROWS * blocks[0].input.numel() * blocks[0].input.element_size() > STREAM_BYTES:
        return None  # rows too wide to gain from batching
    position = {id(p): k for k, p in enumerate(params)}
    owned = {id(p) for block in blocks for p in block.params}
    outside = [p for p in params if id(p) not in owned]
    result = [0.0] * num_branches
    summed: list[torch.Tensor | None] = [None] * len(params)

    def account(rows: list[int], targets: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        for p, d in zip(targets, grads):
            if d is None:
                continue
            k = position[id(p)]
            summed[k] = d.sum(0) if summed[k] is None else summed[k] + d.sum(0)
            rows_d = d.flatten(1).double()
            if metric == "grad_diff":
                values = rows_d.pow(2).sum(1)
            else:
                g = full[k].double().flatten()
                values = (g.norm() - (g - rows_d).norm(dim=1)) ** 2
            for r, v in zip(rows, values.tolist()):
                result[r] += v

    def backward(stages: list[tuple[torch.Tensor, torch.Tensor]], targets: list[torch.Tensor]):
        prepare()
        return torch.autograd.grad([out for out, _ in stages], targets, [g for _, g in stages],
                                   retain_graph=True, allow_unused=True, is_grads_batched=True)

    rows: list[int] = []
    carried: torch.Tensor | None = None  # rows' gradients at the input of the block above
    above: torch.Tensor | None = None
    for block in reversed(blocks):
        new = [i for i in block.branches if i in incoming]
        every = rows + new
        if not every:
            continue
        into = [block.input] if block.input.requires_grad else []
        chunk = _rows_per_call(block.params, block.input)
        carried_next = []
        for start in range(0, len(every), chunk):
            part = every[start:start + chunk]
            stages = []
            if carried is not None and start < len(rows):
                head = carried[start:start + chunk]
                pad = head.new_zeros((len(part) - head.shape[0], *head.shape[1:]))
                stages.append((above, torch.cat([head, pad])))
            for j, i in enumerate(part):
                if i in new:
                    y, g_out = incoming[i]
                    g = y.new_zeros((len(part), *y.shape))
                    g[j] = g_out
                    stages.append((y, g))
            grads = backward(stages, into + list(block.params))
            if into:
                carried_next.append(grads[0] if grads[0] is not None else torch.zeros(
                    (len(part), *block.input.shape), dtype=block.input.dtype, device=block.input.device))
            account(part, block.params, grads[len(into):])
        rows, carried, above = (every, torch.cat(carried_next), block.input) if into else ([], None, None)
    if carried is not None and outside:
        chunk = _rows_per_call(outside, carried[0])
        for start in range(0, len(rows), chunk):
            account(rows[start:start + chunk], outside,
                    backward([(above, carried[start:start + chunk])], outside))

    live = sorted(incoming)
    prepare()
    check = torch.autograd.grad([incoming[i][0] for i in live], params, [incoming[i][1] for i in live],
                                retain_graph=True, allow_unused=True)
    for k, (expected, got) in enumerate(zip(check, summed)):
        expected = torch.zeros_like(params[k]) if expected is None else expected
        got = torch.zeros_like(params[k]) if got is None else got
        error = float((expected.double() - got.double()).norm()) / (float(expected.double().norm()) + 1e-30)
        if error > SUM_RTOL:
            logger.debug("batched sensitivity: parameter %d does not sum up (relative error %.1e); measuring "
                         "branch by branch", k, error)
            return None
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

    def gradient_with(mask: list[bool]) -> list[torch.Tensor]:
        return gradient(loss_with_mask(mask), params)

    full = gradient_with([False] * num_branches)
    result = []
    for i in range(num_branches):
        mask = [False] * num_branches
        mask[i] = True
        dropped = gradient_with(mask)
        result.append(score(full, [g - d for g, d in zip(full, dropped)], metric))
    return result


def gradient(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The gradient of ``loss`` for each of ``params`` (zeros where it does not reach one)."""
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    return _as_list(torch.autograd.grad(loss, params, allow_unused=True), params)
