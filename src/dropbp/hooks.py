"""The mechanism: forward pre/post hooks on existing modules, as small hook objects.

For one call of a branch in a training forward::

    pre-hook:   decide = this forward's mask[branch];  if dropped: grad mode off
    forward:    the branch runs; with grad off autograd builds no graph and saves nothing
    post-hook:  restore grad mode

The dropped branch's output then enters the residual add as a constant: the gradient
flows through the skip path only. Nothing is wrapped or renamed; the module tree,
``state_dict()`` keys and ``forward``'s signature stay as they were.

The decision is read from the :class:`~dropbp.checkpointing.ForwardContext` of the
training forward that makes the call: the entry pre-hook creates it (and draws the mask),
and a gradient-checkpointing recompute finds its own forward's context again through
:class:`KeyHook` records. Which forward a call belongs to, the FLOP metering and the
checkpoint replays are the routing's (:class:`~dropbp.forwards.Forwards`): the hooks only
ask it. State that lives from a pre-hook to its post-hook is per thread.

Every hook also carries ``owner``, the object :func:`dropbp.find_handle` returns for it
(the handle); the hooks never use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dropbp.checkpointing import in_backward
from dropbp.errors import DropBPError
from dropbp.forwards import Forwards, Frame
from dropbp.tensors import first_input

__all__ = ["BranchHook", "EntryHook", "KeyHook", "register"]


def _refuse_copy(module: nn.Module, owner: nn.Module) -> None:
    if module is not owner and module.training and torch.is_grad_enabled():
        raise DropBPError(
            "the model was copied without its DropBP state (nn.DataParallel replicas share the hooks "
            "across threads); train with torchrun and DistributedDataParallel, or copy.deepcopy the model"
        )


# ------------------------------------------------------------------ hook objects
class EntryHook:
    """On the model DropBP was applied to and on every module that holds all its branches.

    A training forward starts at the outermost of these modules that it calls: the model
    itself, or a part of it such as the decoder body (``model.model(...)``, as distillation
    trainers and fused cross-entropy losses call it) or the model left by PEFT's
    ``merge_and_unload()``. That call gets a new context, and with it its own mask; an
    entry module deeper inside it belongs to the same forward. An entry module called
    again from inside its own forward (a hook that runs the model on another batch)
    starts a forward of its own.

    Args:
        routing: The routing whose forwards this hook starts.
        module: The module the hook is registered on (a copy of the model that shares
            the hooks, as ``nn.DataParallel`` makes, is refused).
        depth: How deep ``module`` lies on the chain of entry modules (0: the model).
        owner: What :func:`dropbp.find_handle` returns for this hook.
    """

    def __init__(self, routing: Forwards, module: nn.Module, depth: int, owner: Any = None):
        self.routing, self.module, self.depth, self.owner = routing, module, depth, owner

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        forwards = self.routing
        _refuse_copy(module, self.module)
        state = forwards.thread
        if state.active and state.opened[-1][0] < self.depth:  # inside an outer entry's forward, which decides
            state.active.append(state.active[-1])
            state.opened.append((state.opened[-1][0], False))
            return
        state.opened.append((self.depth, True))
        if not module.training:
            state.active.append(None)
            return
        if in_backward():  # the whole entry module is checkpointed and being recomputed
            forwards.enter_recompute(first_input(args, kwargs), forwards.table.all_indices)
            state.active.append(None)
            return
        state.active.append(forwards.new_context() if torch.is_grad_enabled() else None)

    def post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        forwards = self.routing
        state = forwards.thread
        if not state.active:
            return None
        context, (_, opened) = state.active.pop(), state.opened.pop()
        if context is None or not opened:
            return None
        forwards.close_frames(context)
        anchored = forwards.anchored(context, output)
        forwards.watch_backward(context, output if anchored is None else anchored)
        return anchored


class KeyHook:
    """On the modules around and beside branches: links a recompute to its forward.

    In a training forward it records the module's first input; inside a backward (a
    checkpoint recompute) it looks that input up, and the forward found there decides
    for the ``covers`` branches until the recompute ends.
    """

    def __init__(self, routing: Forwards, covers: tuple[int, ...], owner: Any = None):
        self.routing, self.covers, self.owner = routing, covers, owner

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        x = first_input(args, kwargs)
        if x is None:
            return
        if in_backward():
            self.routing.enter_recompute(x, self.covers)
            return
        context = self.routing.current_context()
        if context is not None:
            self.routing.keys.record(x, context)


class BranchHook:
    """On a branch: its pre-hook decides and turns grad mode off, its post-hook restores it."""

    def __init__(self, routing: Forwards, index: int, owner: Any = None):
        self.routing, self.index, self.owner = routing, index, owner

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        routing, index = self.routing, self.index
        if not module.training:
            active = routing.thread.active
            if active and active[-1] is not None and torch.is_grad_enabled() and not in_backward():
                raise DropBPError(
                    f"branch {routing.table.branches[index].name!r} is in eval mode inside a training forward, so DropBP "
                    "cannot drop it; call model.train() on the whole model (or model.eval() on the whole model)"
                )
            return
        recompute = in_backward()
        context = routing.recompute_context(index) if recompute else routing.current_context(index)
        if context is None:
            return
        grad = torch.is_grad_enabled()
        dropped = context.mask[index]
        frame = Frame(context, grad, dropped and grad, recompute=recompute)
        if not recompute:
            routing.first_pass_call(frame, index, args, kwargs)
        routing.thread.frames.setdefault(index, []).append(frame)
        if frame.dropped:
            torch.set_grad_enabled(False)

    def post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        frames = self.routing.thread.frames.get(self.index)
        if not module.training or not frames:
            return None
        frame = frames.pop()
        if frame.dropped:
            torch.set_grad_enabled(frame.grad_was_enabled)
        return self.routing.after_call(frame, self.index, output)


def register(module: nn.Module, pre: Callable | None = None, post: Callable | None = None) -> list:
    """Attach hook callables to ``module``; returns the removable handles.

    The post-hook is registered with ``always_call=True`` so grad mode is restored even
    when the forward raises; pre-hooks see keyword arguments too.
    """
    handles = []
    if pre is not None:
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    if post is not None:
        handles.append(module.register_forward_hook(post, always_call=True))
    return handles
