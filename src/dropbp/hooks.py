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
:class:`KeyHook` records. State that lives from a pre-hook to its post-hook is per thread.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dropbp.checkpointing import ForwardContext, in_backward
from dropbp.errors import DropBPError
from dropbp.validation import check_rate

if TYPE_CHECKING:
    from dropbp.handle import DropBPHandle

__all__ = [
    "Branch", "BranchHook", "EntryHook", "Frame", "KeyHook", "ThreadState", "first_input", "first_tensor", "register",
    "replace_first_tensor", "replace_items",
]


@dataclass(eq=False)
class Branch:
    """One residual branch (an attention or MLP sub-block).

    Attributes:
        name: Qualified module name in the model DropBP was applied to
            (``"<first>..<last>"`` for a span of sibling modules, such as OPT's MLP).
        module: The branch module itself (the first module of a span).
        index: Position in execution order.
        end_module: The module whose forward ends the branch (``module`` unless a span).
        modules: Every module of the branch (the siblings a span covers).
        flops: Forward FLOPs of this branch at the last training input shape, counted with
            ``torch.utils.flop_counter``; ``None`` until a training forward has run it.
    """

    name: str
    module: nn.Module
    index: int
    end_module: nn.Module | None = None
    modules: tuple[nn.Module, ...] = ()
    flops: int | None = None
    _drop_rate: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        if self.end_module is None:
            self.end_module = self.module
        if not self.modules:
            self.modules = (self.module,) if self.end_module is self.module else (self.module, self.end_module)

    def parameters(self) -> list[nn.Parameter]:
        """The branch's own parameters (each once)."""
        seen: dict[int, nn.Parameter] = {}
        for module in self.modules:
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    @property
    def drop_rate(self) -> float:
        """Probability that this branch's backward is skipped in a step."""
        return self._drop_rate

    @drop_rate.setter
    def drop_rate(self, value: float) -> None:
        self._drop_rate = check_rate(value, f"drop rate of {self.name}")

    def __repr__(self) -> str:
        return f"Branch(name={self.name!r}, drop_rate={self._drop_rate:.3f}, flops={self.flops})"


# ------------------------------------------------------------------ tensor helpers
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


# ------------------------------------------------------------------ per-thread state
class ThreadState(threading.local):
    """What one thread's hooks hand each other; another thread's forwards never see it.

    Attributes:
        active: One entry per entry-module call running in this thread: the forward's
            context, or None for a forward that trains nothing (eval mode, ``no_grad``,
            ``generate``). An entry module called inside another repeats the outer entry.
        opened: Parallel to ``active``: the depth of the entry module that started that
            forward, and whether this call started it (so that only its post-hook closes it).
        frames: Branch index -> the open calls' :class:`Frame` (pre-hook to post-hook).
        recompute: Branch index -> the forward whose recompute is running, in a backward.
        task: The backward (graph task id) that will clear ``recompute`` when it ends.
    """

    def __init__(self) -> None:
        self.active: list[ForwardContext | None] = []
        self.opened: list[tuple[int, bool]] = []
        self.frames: dict[int, list[Frame]] = {}
        self.recompute: dict[int, ForwardContext] = {}
        self.task: int | None = None


@dataclass
class Frame:
    """What a branch's pre-hook hands to its post-hook for one call."""

    context: ForwardContext
    grad_was_enabled: bool
    dropped: bool
    recompute: bool = False
    counting: Any = None  # the open FLOP count, on the first call at a new training shape
    keep_rng: tuple | None = None  # (RNG states, device) when the output is kept for a replay


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
        handle: The handle whose forwards this hook starts.
        module: The module the hook is registered on (a copy of the model that shares
            the hooks, as ``nn.DataParallel`` makes, is refused).
        depth: How deep ``module`` lies on the chain of entry modules (0: the model).
    """

    def __init__(self, handle: DropBPHandle, module: nn.Module, depth: int):
        self.handle = handle
        self.module = module
        self.depth = depth

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        forwards = self.handle._forwards
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
            forwards.enter_recompute(first_input(args, kwargs), self.handle._all_indices)
            state.active.append(None)
            return
        state.active.append(forwards.new_context() if torch.is_grad_enabled() else None)

    def post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        forwards = self.handle._forwards
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

    def __init__(self, handle: DropBPHandle, covers: tuple[int, ...]):
        self.handle = handle
        self.covers = covers

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        x = first_input(args, kwargs)
        if x is None:
            return
        handle = self.handle
        if in_backward():
            handle._forwards.enter_recompute(x, self.covers)
            return
        context = handle._forwards.current_context()
        if context is not None:
            handle._forwards.keys.record(x, context)


class BranchHook:
    """On a branch: its pre-hook decides and turns grad mode off, its post-hook restores it."""

    def __init__(self, handle: DropBPHandle, index: int):
        self.handle = handle
        self.index = index

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        handle, index = self.handle, self.index
        if not module.training:
            active = handle._forwards.thread.active
            if active and active[-1] is not None and torch.is_grad_enabled() and not in_backward():
                raise DropBPError(
                    f"branch {handle.branches[index].name!r} is in eval mode inside a training forward, so DropBP "
                    "cannot drop it; call model.train() on the whole model (or model.eval() on the whole model)"
                )
            return
        recompute = in_backward()
        context = (handle._forwards.recompute_context(index) if recompute
                   else handle._forwards.current_context(index))
        if context is None:
            return
        grad = torch.is_grad_enabled()
        dropped = context.mask[index]
        frame = Frame(context, grad, dropped and grad, recompute=recompute)
        if not recompute:
            handle._forwards.first_pass_call(frame, index, args, kwargs)
        handle._forwards.thread.frames.setdefault(index, []).append(frame)
        if frame.dropped:
            torch.set_grad_enabled(False)

    def post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        frames = self.handle._forwards.thread.frames.get(self.index)
        if not module.training or not frames:
            return None
        frame = frames.pop()
        if frame.dropped:
            torch.set_grad_enabled(frame.grad_was_enabled)
        return self.handle._forwards.after_call(frame, self.index, output)


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
