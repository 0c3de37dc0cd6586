"""Which training forward each branch call belongs to, and what that forward keeps.

The hooks (:mod:`dropbp.hooks`) ask this object three questions: which forward is this
call part of (a new one at the root, the running one inside it, the recomputed one in a
backward), what to do before the branch runs (count FLOPs at a new training shape, plan
a checkpoint replay), and what to do after it (keep the output, capture it for the
sensitivity measurement). One ``Forwards`` serves one handle; its state is per process
and, where it lives from a pre-hook to a post-hook, per thread.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parallel import DistributedDataParallel

from dropbp import hooks
from dropbp.checkpointing import (
    ForwardContext,
    RecomputeKeys,
    Replays,
    make_replay,
    raise_ambiguous,
    rng_state,
)
from dropbp.distributed import require_find_unused
from dropbp.errors import DropBPError
from dropbp.zero import SENSITIVITY_THROUGH_ENGINE_REFUSED, active_engine, guard_engine

if TYPE_CHECKING:
    from dropbp.handle import DropBPHandle

__all__ = ["COMPILE_REFUSED", "Forwards", "refuse_compile"]

COMPILE_REFUSED = (
    "DropBP does not support torch.compile for training: a compiled graph fixes which branches build a "
    "backward, so it would either recompile for every new mask or compute wrong gradients; train the model "
    "uncompiled (HF Trainer: torch_compile=False), or call handle.remove() before compiling"
)


def refuse_compile() -> None:
    """Fail the compilation itself; an exception raised in traced code would only break the graph."""
    from torch._dynamo.comptime import comptime

    def fail(ctx: Any) -> None:
        raise RuntimeError(COMPILE_REFUSED)

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
    """The per-forward routing behind one handle's hooks.

    Args:
        handle: The handle whose mask stream, rates and branches it serves.
    """

    def __init__(self, handle: DropBPHandle):
        self.handle = handle
        self.thread = hooks.ThreadState()
        self.keys = RecomputeKeys()
        self.replays = Replays(
            [b.module if b.end_module is b.module else None for b in handle.branches], self.replay_context
        )
        self._standing: ForwardContext | None = None
        self._capture_next = False
        self._captured: ForwardContext | None = None
        self._checked_ddp: set[int] = set()
        self._checked_engines: set[int] = set()
        self._anchor: torch.Tensor | None = None
        self._running: dict[int, ForwardContext] = {}  # id -> a forward whose backward is running

    def new_context(self) -> ForwardContext:
        """The context of a training forward of the root module, with its mask."""
        if torch.compiler.is_compiling():
            refuse_compile()
        self._check_ddp_wrapper()
        self._check_deepspeed_engine()
        if self.handle._overrides:
            mask = self.handle._overrides[-1]
        elif self.handle.auto_step:
            mask = tuple(self.handle.step())
        else:
            mask = tuple(self.handle._mask)
        context = ForwardContext(mask)
        if self._capture_next:
            self._capture_next = False
            context.capture = {}
            self._captured = context
        return context

    def current_context(self) -> ForwardContext | None:
        """The training forward a first-pass call belongs to, or None if nothing trains."""
        active = self.thread.active
        if active:
            return active[-1]
        if not torch.is_grad_enabled():
            return None
        # A branch called without the root's hooks (a layer called directly): the standing mask.
        mask = self.handle._overrides[-1] if self.handle._overrides else tuple(self.handle._mask)
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
                raise_ambiguous(self.handle.branches[covers[0]].name, found)
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
            raise_ambiguous(self.handle.branches[index].name, live)
        return ForwardContext(live[0].mask)  # the decision is known, whose kept output is not

    def replay_context(self, index: int) -> ForwardContext | None:
        return self.thread.recompute.get(index)

    def first_pass_call(self, frame: hooks.Frame, index: int, args: tuple, kwargs: dict) -> None:
        """Bookkeeping for a branch call in a training forward (not in its recompute)."""
        context = frame.context
        if frame.grad_was_enabled and torch.compiler.is_compiling():
            refuse_compile()  # a compiled layer inside an eager model
        calls = context.calls[index] = context.calls.get(index, 0) + 1
        if calls > 1:  # which call a recompute asks for is ambiguous: run the branch again there
            self.replays.discard(context, index)
        frame.counting = self.handle._meter.start(index, args, kwargs)
        self.handle.branches[index].flops = self.handle._meter.flops[index]
        x = hooks.first_input(args, kwargs)
        if x is None:
            return
        frame.input_requires_grad = x.requires_grad
        if calls == 1 and context.mask[index] and self.handle.replay and self._will_recompute(index, context):
            rng = rng_state(x.device)
            if rng is not None:
                frame.keep_rng = (rng, x.device)

    def after_call(self, frame: hooks.Frame, index: int, output: Any) -> Any:
        """The post-hook's work once grad mode is restored; may return a replacement output."""
        if frame.counting is not None:
            self.handle._meter.stop(index, frame.counting, completed=output is not None)
            self.handle.branches[index].flops = self.handle._meter.flops[index]
        if output is None:  # the forward raised; always_call only restores state
            return None
        context = frame.context
        if frame.keep_rng is not None:
            rng, device = frame.keep_rng
            self.replays.keep(context, index, make_replay(output, rng, device))
        if context.capture is not None and not frame.dropped and not frame.recompute:
            out = hooks.first_tensor(output)
            if out is not None:
                context.capture.setdefault(index, []).append(out)
                # The model gets a copy: a layer that adds into the branch's output in place (Falcon's
                # `mlp_output += attention_output`) would otherwise make the captured tensor the sum, and
                # its partial backward would run through the other branch too.
                return hooks.replace_first_tensor(output, out.clone())
        if frame.dropped and index == len(self.handle.branches) - 1 and not frame.input_requires_grad:
            return self._anchored(output)
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
                    self.handle._meter.stop(index, frame.counting, completed=False)
                unclosed.append(index)
        if unclosed:
            torch.set_grad_enabled(True)  # a forward gets a context only when it starts with grad on
        if unclosed and sys.exc_info()[0] is None:  # always_call post-hooks also run while an error unwinds
            branch = self.handle.branches[unclosed[0]]
            raise DropBPError(
                f"branch {branch.name!r} started but its last module never ran in this forward, so the rest of the "
                "forward ran without gradients; pass branches= patterns whose modules the forward calls"
            )

    def _check_ddp_wrapper(self) -> None:
        """Refuse a DDP wrapper that would hang or fail on parameters without gradients."""
        active = getattr(DistributedDataParallel, "_get_active_ddp_module", lambda: None)()
        if active is None or id(active) in self._checked_ddp:
            return
        self._checked_ddp.add(id(active))
        require_find_unused(active)

    def _check_deepspeed_engine(self) -> None:
        """Under a DeepSpeed engine: refuse what ZeRO cannot make exact, and guard ZeRO-3 against stale gradients."""
        engine = active_engine()
        if engine is not None and self._capture_next:
            raise DropBPError(SENSITIVITY_THROUGH_ENGINE_REFUSED)
        if engine is None or id(engine) in self._checked_engines:
            return
        guard = guard_engine(engine, self.handle.model, self.handle.auto_step)
        self._checked_engines.add(id(engine))
        if guard is not None and guard not in self.handle._zero_guards:
            self.handle._zero_guards.append(guard)

    def _will_recompute(self, index: int, context: ForwardContext) -> bool:
        """Whether gradient checkpointing will run this call again in backward.

        Reentrant checkpointing (its first pass runs without grad) recomputes the whole
        layer. Non-reentrant checkpointing stops once the tensors the backward needs are
        rebuilt, so it reaches a dropped branch only if a later branch of the same layer
        builds a graph; keeping an output nobody replays would only cost memory.
        """
        owner = self.handle._owners[index]
        if owner is None or owner.gradient_checkpointing is not True or not owner.training:
            return False
        return not torch.is_grad_enabled() or any(not context.mask[j] for j in self.handle._later_in_layer[index])

    def _anchored(self, output: Any) -> Any:
        """Keep the loss differentiable when nothing trainable is left in this step's graph.

        If every trainable branch was dropped and nothing below requires grad (LoRA on
        attention and MLP only), the loss would have no ``grad_fn`` and ``loss.backward()``
        would raise. Adding a zero-valued leaf to the last branch's output keeps the
        backward legal; no parameter receives a gradient from it.
        """
        out = hooks.first_tensor(output)
        if out is None or not out.is_floating_point():
            return None
        if self._anchor is None:
            self._anchor = torch.zeros((), requires_grad=True)
        return hooks.replace_first_tensor(output, out + self._anchor.to(dtype=out.dtype, device=out.device))

    @contextlib.contextmanager
    def capturing(self) -> Iterator[Callable[[], ForwardContext | None]]:
        """Record the branch outputs of the next training forward; yields a getter for them."""
        self._capture_next, self._captured = True, None
        try:
            yield lambda: self._captured
        finally:
            if self._captured is not None:
                self._captured.capture = None
            self._capture_next, self._captured = False, None
