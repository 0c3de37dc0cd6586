"""The routing: which training forward each branch call belongs to, and what that forward keeps.

The hooks (:mod:`dropbp.hooks`) ask this object three questions: which forward is this
call part of (a new one at the root, the running one inside it, the recomputed one in a
backward), what to do before the branch runs (count FLOPs at a new training shape, plan
a checkpoint replay), and what to do after it (keep the output, capture it for the
sensitivity measurement). One ``Forwards`` serves one model's branch table and mask
stream; its state is per process and, where it lives from a pre-hook to a post-hook, per
thread. The environment checks (``torch.compile``, a DDP wrapper, a DeepSpeed engine) run
here, once per training forward, when its context is made.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_flatten, tree_unflatten

from dropbp.branches import BranchTable
from dropbp.checkpointing import (
    ForwardContext,
    RecomputeKeys,
    Replays,
    make_replay,
    raise_ambiguous,
    rng_state,
)
from dropbp.distributed import require_find_unused
from dropbp.errors import COMPILE_REFUSED, SENSITIVITY_THROUGH_ENGINE_REFUSED, DropBPError
from dropbp.flops import FlopMeter
from dropbp.masks import MaskStream
from dropbp.tensors import first_input, replace_items
from dropbp.zero import active_engine, guard_engine

__all__ = ["Forwards", "Frame", "ThreadState", "refuse_compile"]


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


def refuse_compile() -> None:
    """Fail the compilation itself; an exception raised in traced code would only break the graph."""
    from torch._dynamo.comptime import comptime

    def fail(ctx: Any) -> None:
        raise DropBPError(COMPILE_REFUSED)

    comptime(fail)


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output that a backward can start from (ModelOutput, tuple or tensor)."""
    if isinstance(output, torch.Tensor):
        values = [output]
    elif isinstance(output, dict):  # transformers' ModelOutput is an OrderedDict
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        values = []
    return [v for v in values if isinstance(v, torch.Tensor) and v.requires_grad]


class Forwards:
    """The per-forward routing behind one model's hooks.

    Args:
        model: The module DropBP was applied to (for the DeepSpeed guard).
        table: Its branch table.
        stream: The mask stream a new training forward takes its mask from.
        meter: The FLOP meter of the branches.
        draw: Advances the stream and returns the new mask (with ``auto_step``, each
            training forward calls it once).
        auto_step: Whether each training forward draws the next mask.
        replay: Under gradient checkpointing, replay a dropped branch's kept output in the
            recompute instead of running it again.
    """

    def __init__(self, model: Any, table: BranchTable, stream: MaskStream, meter: FlopMeter,
                 draw: Callable[[], tuple[bool, ...]], auto_step: bool, replay: bool):
        self.model, self.table, self.stream, self.meter, self.draw = model, table, stream, meter, draw
        self.auto_step, self.replay = auto_step, replay
        self._init_runtime()

    def _init_runtime(self) -> None:
        """The per-process state: a copy or an unpickled model starts with none of it."""
        self.thread = ThreadState()
        self.keys = RecomputeKeys()
        self.replays = Replays(
            [b.module if b.end_module is b.module else None for b in self.table.branches], self.replay_context
        )
        self._standing: ForwardContext | None = None
        self._captured: list[ForwardContext] | None = None  # while capturing: every training forward
        self.trained_forwards = 0  # training forwards started so far (contexts created)
        # Keyed by the objects themselves: a new wrapper or engine can reuse a freed one's id().
        self._checked_ddp: weakref.WeakSet = weakref.WeakSet()
        self._checked_engines: weakref.WeakSet = weakref.WeakSet()
        self._running: dict[int, ForwardContext] = {}  # id -> a forward whose backward is running

    _PERSISTENT = ("model", "table", "stream", "meter", "draw", "auto_step", "replay")

    def _refuse_copy_while_kept(self, action: str) -> None:
        if any(self.replays.shadowed()):
            raise DropBPError(
                f"cannot {action} the model while outputs are kept for a gradient-checkpointing recompute; "
                f"{action} it before the training forward or after its backward"
            )

    def __deepcopy__(self, memo: dict) -> Forwards:
        # Reached through the hooks when the model is deep-copied: the copy routes the copied modules,
        # with the same stream state (seed, step, rates), and nothing in flight.
        self._refuse_copy_while_kept("copy")
        clone = object.__new__(Forwards)
        memo[id(self)] = clone
        for name in self._PERSISTENT:
            setattr(clone, name, copy.deepcopy(getattr(self, name), memo))
        clone._init_runtime()
        return clone

    def __getstate__(self) -> dict[str, Any]:
        # Reached through the hooks when the model is pickled (torch.save(model)): the unpickled model
        # has DropBP with the same rates, seed and step; the per-process state starts afresh.
        self._refuse_copy_while_kept("pickle")
        return {name: getattr(self, name) for name in self._PERSISTENT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def new_context(self) -> ForwardContext:
        """The context of a training forward of the root module, with its mask."""
        if torch.compiler.is_compiling():
            refuse_compile()
        self._check_ddp_wrapper()
        self._check_deepspeed_engine()
        mask = self.draw() if self.auto_step and not self.stream.is_forced else self.stream.current()
        context = ForwardContext(mask)
        self.trained_forwards += 1
        if self._captured is not None:
            context.capture = {}
            self._captured.append(context)
        return context

    def current_context(self, index: int | None = None) -> ForwardContext | None:
        """The training forward a first-pass call belongs to, or None if nothing trains.

        Args:
            index: The branch asking, or None for a module beside the branches.

        Raises:
            DropBPError: If branch ``index`` runs with grad outside every entry module's
                forward while each forward is meant to draw its own mask (``auto_step``).
        """
        active = self.thread.active
        if active:
            return active[-1]
        if not torch.is_grad_enabled():
            return None
        # A layer or branch called directly, outside every entry module: it can only use the mask in
        # force, which is right where the caller steps the masks (auto_step=False) or forces one.
        if self.auto_step and not self.stream.is_forced:
            if index is None:
                return None
            raise DropBPError(
                f"branch {self.table.branches[index].name!r} ran in a training forward that entered neither the "
                "model DropBP was applied to nor a module holding all its branches, so no mask was drawn for it; "
                "call the model (or its decoder), or apply with auto_step=False and call handle.step() each step"
            )
        mask = self.stream.current()
        if self._standing is None or self._standing.mask != mask:
            self._standing = ForwardContext(mask)
        return self._standing

    def enter_recompute(self, x: torch.Tensor | None, covers: tuple[int, ...]) -> None:
        """In a backward: if ``x`` was a training forward's input, its recompute starts here."""
        found = self.keys.lookup(x) if x is not None else []
        if len(found) > 1 and self._running:  # forwards whose backward has ended are not recomputed now
            found = [c for c in found if c.in_backward] or found
        if not found:
            return
        first = found[0]
        if len(found) > 1:  # one tensor fed several forwards: exact only where their masks agree
            if any(other.mask[i] != first.mask[i] for other in found[1:] for i in covers):
                raise_ambiguous(self.table.branches[covers[0]].name, found)
            # Whose kept output to replay is unknown: run the branches again (same decisions).
            first = ForwardContext(first.mask)
        state = self.thread
        state.recompute.update(dict.fromkeys(covers, first))
        task = torch._C._current_graph_task_id()
        if state.task != task:  # forget at the end of this backward which forward it recomputed
            state.task = task
            recompute = state.recompute
            torch.autograd.Variable._execution_engine.queue_callback(recompute.clear)

    def watch_backward(self, context: ForwardContext, output: Any) -> None:
        """Mark ``context`` as in backward from when a backward reaches its outputs until it ends.

        A recompute that no record links to its forward (the tensors recorded in the first
        pass are gone) is then told apart from finished forwards whose inputs the caller
        still holds (a batch kept for logging or for the sensitivity measurement).
        """
        nodes = {id(t.grad_fn): t.grad_fn for t in _output_tensors(output) if t.grad_fn is not None}
        if not nodes:
            return
        running = self._running

        def reached(*_: Any) -> None:
            if not context.in_backward:
                context.in_backward = True
                running[id(context)] = context

                def ended() -> None:
                    context.in_backward = False
                    running.pop(id(context), None)

                torch.autograd.Variable._execution_engine.queue_callback(ended)

        for node in nodes.values():
            node.register_prehook(reached)

    def recompute_context(self, index: int) -> ForwardContext | None:
        """The training forward whose recompute calls branch ``index`` now (in a backward)."""
        context = self.thread.recompute.get(index)
        if context is not None:
            return context
        live = list(self._running.values()) or self.keys.live_contexts()
        if not live:
            return None  # not the recompute of a training forward
        if any(c.mask[index] != live[0].mask[index] for c in live):
            raise_ambiguous(self.table.branches[index].name, live)
        return ForwardContext(live[0].mask)  # the decision is known, whose kept output is not

    def replay_context(self, index: int) -> ForwardContext | None:
        return self.thread.recompute.get(index)

    def first_pass_call(self, frame: Frame, index: int, args: tuple, kwargs: dict) -> None:
        """Bookkeeping for a branch call in a training forward (not in its recompute)."""
        context = frame.context
        if frame.grad_was_enabled and torch.compiler.is_compiling():
            refuse_compile()  # a compiled layer inside an eager model
        calls = context.calls[index] = context.calls.get(index, 0) + 1
        if calls > 1:  # which call a recompute asks for is ambiguous: run the branch again there
            self.replays.discard(context, index)
        frame.counting = self.meter.start(index, args, kwargs)
        self.table.branches[index].flops = self.meter.flops[index]
        x = first_input(args, kwargs)
        if frame.dropped and not context.cut:
            branch = self.table.branches[index]
            context.cut = (x is not None and x.requires_grad) or any(p.requires_grad for p in branch.parameters())
        if x is None:
            return
        if calls == 1 and context.mask[index] and self.replay and self._will_recompute(index, context):
            rng = rng_state(x.device)
            if rng is not None:
                frame.keep_rng = (rng, x.device)

    def after_call(self, frame: Frame, index: int, output: Any) -> Any:
        """The post-hook's work once grad mode is restored; may return a replacement output."""
        if frame.counting is not None:
            self.meter.stop(index, frame.counting, completed=output is not None)
            self.table.branches[index].flops = self.meter.flops[index]
        if output is None:  # the forward raised; always_call only restores state
            return None
        context = frame.context
        if frame.keep_rng is not None:
            rng, device = frame.keep_rng
            self.replays.keep(context, index, make_replay(output, rng, device))
        if context.capture is not None and not frame.dropped and not frame.recompute:
            # Every tensor of the output is measured (a tuple's or a dict's): dropping the branch cuts them
            # all. Each is measured at a copy that only the model's use of it reaches: where one output
            # depends on another (attention weights inside the attention output), the gradient at the
            # output itself would also count the path through the other. The model gets a second copy: a
            # layer that adds into the branch's output in place (Falcon's `mlp_output += attention_output`)
            # would otherwise make the measured tensor the sum.
            leaves, spec = tree_flatten(output)
            measured = {k: t.clone() for k, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad}
            if measured:
                context.capture.setdefault(index, []).append(list(measured.values()))
                return tree_unflatten([measured[k].clone() if k in measured else t for k, t in enumerate(leaves)], spec)
        return None

    def close_frames(self, context: ForwardContext) -> None:
        """Close what the forward left open between a span's first and last module.

        After an error, its FLOP counts are closed and the grad mode is restored, so the
        error leaks neither a dispatch mode nor no-grad. A forward that returned normally
        with a span still open skipped the span's last module (for example Bloom with
        ``pretraining_tp > 1`` and ``slow_but_exact``, which multiplies by the weight
        directly): everything after the span's start ran without grad, so this raises.

        Raises:
            DropBPError: If a span was left open by a forward that did not raise.
        """
        unclosed = []
        for index, frames in self.thread.frames.items():
            while frames and frames[-1].context is context:
                frame = frames.pop()
                if frame.counting is not None:
                    self.meter.stop(index, frame.counting, completed=False)
                unclosed.append(index)
        if unclosed:
            torch.set_grad_enabled(True)  # a forward gets a context only when it starts with grad on
        if unclosed and sys.exc_info()[0] is None:  # always_call post-hooks also run while an error unwinds
            branch = self.table.branches[unclosed[0]]
            raise DropBPError(
                f"branch {branch.name!r} started but its last module never ran in this forward, so the rest of the "
                "forward ran without gradients; pass branches= patterns whose modules the forward calls"
            )

    def _check_ddp_wrapper(self) -> None:
        """Refuse a DDP wrapper that would hang or fail on parameters without gradients."""
        active = getattr(DistributedDataParallel, "_get_active_ddp_module", lambda: None)()
        if active is None or active in self._checked_ddp:
            return
        self._checked_ddp.add(active)
        require_find_unused(active)

    def _check_deepspeed_engine(self) -> None:
        """Under a DeepSpeed engine: refuse what ZeRO cannot make exact, and guard ZeRO-3 against stale gradients."""
        engine = active_engine()
        if engine is not None and self._captured is not None:
            raise DropBPError(SENSITIVITY_THROUGH_ENGINE_REFUSED)
        if engine is None or engine in self._checked_engines:
            return
        guard_engine(engine, self.model, self.auto_step)
        self._checked_engines.add(engine)

    def _will_recompute(self, index: int, context: ForwardContext) -> bool:
        """Whether gradient checkpointing will run this call again in backward.

        Reentrant checkpointing (its first pass runs without grad) recomputes the whole
        layer. Non-reentrant checkpointing stops once the tensors the backward needs are
        rebuilt, so it reaches a dropped branch only if a later branch of the same layer
        builds a graph; keeping an output nobody replays would only cost memory.
        """
        owner = self.table.owners[index]
        if owner is None or owner.gradient_checkpointing is not True or not owner.training:
            return False
        return not torch.is_grad_enabled() or any(not context.mask[j] for j in self.table.later_in_layer[index])

    def anchored(self, context: ForwardContext, output: Any) -> Any:
        """The entry module's output, made differentiable again where dropping cut its graph.

        If every branch that carries gradient was dropped in this forward and nothing else
        on the way requires grad (LoRA on some of the branches only, frozen layers), the
        outputs lose their ``grad_fn`` and ``loss.backward()`` would raise, where the plain
        model's would not. Such outputs get a fresh zero-valued leaf added: the backward is
        legal, and no parameter receives a gradient from it.

        Returns:
            The output with its floating-point tensors anchored, or None if none needed it.
        """
        if not context.cut or not torch.is_grad_enabled():
            return None

        def anchor(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
                return value + torch.zeros((), dtype=value.dtype, device=value.device, requires_grad=True)
            return value

        if isinstance(output, torch.Tensor):
            return anchor(output) if not output.requires_grad else None
        if isinstance(output, dict):  # transformers' ModelOutput: set its fields in place, keeping its type
            for key, value in list(output.items()):
                anchored = anchor(value)
                if anchored is not value:
                    output[key] = anchored
            return output
        if isinstance(output, (tuple, list)):
            return replace_items(output, [anchor(value) for value in output])
        return None

    @contextlib.contextmanager
    def capturing(self) -> Iterator[Callable[[], list[ForwardContext]]]:
        """Record the branch outputs of every training forward in this block; yields a getter for them."""
        self._captured = []
        try:
            yield lambda: list(self._captured or [])
        finally:
            for context in self._captured or []:
                context.capture = None
            self._captured = None
