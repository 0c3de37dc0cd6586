"""Gradient checkpointing: match each recompute to its own training forward, and replay.

Checkpointing runs a layer's forward again inside the backward. That recompute must make
the same drop decisions as the forward it replaces, even when several training forwards
(R-Drop, chosen/rejected pairs, gradient accumulation with ``retain_graph``) are waiting
for their backward at once and each drew its own mask. Nothing in the recompute names its
forward, but its inputs do: checkpointing calls the layer again with the tensors it saved
in the first pass (non-reentrant: the same tensor objects; reentrant: detached views of
the same memory). So every training forward records the first input of the modules around
and beside its branches (:class:`RecomputeKeys`); in a recompute, the first of those
modules whose input is found tells which forward is being recomputed. The records hold
only weak references: they vanish with the tensors, that is, when the backward has freed
the graph.

The replay is an optimisation on top: a dropped branch's output is a constant, so instead
of running the branch again in the recompute its first-pass output can be returned
(:class:`Replays`). It is exact, dropout draws included, and it is off where a branch is
called more than once in one forward (which call a recompute asks for is ambiguous there).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from dropbp.errors import DropBPError

__all__ = [
    "ForwardContext", "RecomputeKeys", "Replay", "Replays", "in_backward", "make_replay", "non_reentrant_checkpointing",
    "raise_ambiguous", "reentrant_checkpointing", "rng_state", "tensor_signature", "unswitchable_checkpointing",
]

_ids = iter(range(1, 1 << 62))
_ids_lock = threading.Lock()


def in_backward() -> bool:
    """True while the autograd engine runs a backward (where checkpointing recomputes)."""
    return torch._C._current_graph_task_id() != -1


@dataclass(eq=False)
class ForwardContext:
    """The state of one training forward, handed from its hooks to its recompute.

    Attributes:
        mask: The drop decision of every branch for this forward (True = dropped).
        id: A number unique in the process, for error messages and tests.
        calls: How many times each branch ran in this forward (first pass only).
        kept: Branch index -> :class:`Replay` kept for the recompute.
        capture: Branch index -> outputs, while the sensitivity measurement records them.
        in_backward: Whether a backward through this forward's outputs is running now.
        cut: Whether a dropped branch of this forward would have carried gradient (it has
            trainable parameters, or its input requires grad): the forward's outputs may
            then have lost their graph, which the entry's post-hook restores.
    """

    mask: tuple[bool, ...]
    id: int = field(default=0)
    calls: dict[int, int] = field(default_factory=dict)
    kept: dict[int, Replay] = field(default_factory=dict)
    capture: dict[int, list[torch.Tensor]] | None = None
    in_backward: bool = False  # a backward through this forward's outputs is running now
    cut: bool = False

    def __post_init__(self) -> None:
        with _ids_lock:
            self.id = next(_ids)


def tensor_signature(x: torch.Tensor) -> tuple | None:
    """Where a tensor's values live: equal for a tensor and its ``detach()``; None if unknown."""
    try:
        return (x.device, x.data_ptr(), x.dtype, tuple(x.shape), x.stride())
    except (RuntimeError, NotImplementedError):  # no storage (meta, fake, some subclasses)
        return None


class RecomputeKeys:
    """Weak records ``input tensor -> training forward`` that identify a recompute's forward.

    A record lives as long as its tensor. Thread-safe: records can die in any thread (the
    autograd engine's, on CUDA).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._by_signature: dict[tuple, list[tuple[weakref.ref, ForwardContext]]] = {}

    def record(self, x: torch.Tensor, context: ForwardContext) -> None:
        """Remember that ``context``'s forward passed ``x`` to a module around its branches."""
        signature = tensor_signature(x)
        if signature is None:
            return
        with self._lock:
            entries = self._by_signature.setdefault(signature, [])
            for ref, ctx in entries:
                if ctx is context and ref() is x:
                    return
            entries.append((weakref.ref(x, self._forget(signature)), context))

    def _forget(self, signature: tuple) -> Callable[[weakref.ref], None]:
        def forget(dead: weakref.ref) -> None:
            with self._lock:
                entries = self._by_signature.get(signature)
                if entries is None:
                    return
                entries[:] = [(ref, ctx) for ref, ctx in entries if ref is not dead]
                if not entries:
                    del self._by_signature[signature]

        return forget

    def lookup(self, x: torch.Tensor) -> list[ForwardContext]:
        """The training forwards (each once) whose still-alive records match ``x``'s memory."""
        signature = tensor_signature(x)
        if signature is None:
            return []
        with self._lock:
            found: list[ForwardContext] = []
            for ref, ctx in self._by_signature.get(signature, ()):
                if ref() is not None and not any(ctx is f for f in found):
                    found.append(ctx)
            return found

    def live_contexts(self) -> list[ForwardContext]:
        """Every training forward that still has a live record."""
        with self._lock:
            found: dict[int, ForwardContext] = {}
            for entries in self._by_signature.values():
                for ref, ctx in entries:
                    if ref() is not None:
                        found.setdefault(id(ctx), ctx)
            return list(found.values())

    def __len__(self) -> int:
        with self._lock:
            return sum(len(entries) for entries in self._by_signature.values())


# ---------------------------------------------------------------------------- replay
@dataclass
class Replay:
    """A dropped branch's first-pass output, kept for the gradient-checkpointing recompute.

    Attributes:
        output: What the branch returned in the first pass.
        rng_before: RNG states before that call, or ``None`` if the call drew no random numbers.
        rng_after: RNG states after that call (``None`` likewise).
        device: The device whose generator the branch draws from.
    """

    output: Any
    rng_before: tuple[torch.Tensor, ...] | None
    rng_after: tuple[torch.Tensor, ...] | None
    device: torch.device


def rng_state(device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """The generator states a branch on ``device`` can draw from; ``None`` if not tracked."""
    if device.type == "cpu":
        return (torch.get_rng_state(),)
    if device.type == "cuda":
        return (torch.get_rng_state(), torch.cuda.get_rng_state(device))
    return None


def _set_rng_state(states: tuple[torch.Tensor, ...], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state(states[1], device)


def _same_rng(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


class Replays:
    """The kept outputs of one handle's branches and the ``forward`` shadows that return them.

    A forward pre-hook cannot skip a module's forward, so while a branch has an output kept
    for some recompute, its module's ``forward`` is shadowed by an instance attribute that
    returns the kept output inside that recompute and calls the real ``forward`` otherwise.
    The shadow is removed as soon as no kept output of that branch is left (replayed, or its
    forward's graph was freed) and by ``remove()``. ``inspect.signature`` sees through it.

    Args:
        modules: The module whose ``forward`` runs each branch.
        context_of: Returns the training forward being recomputed for a branch index.
    """

    def __init__(self, modules: list[nn.Module], context_of: Callable[[int], ForwardContext | None]):
        self._modules = modules
        self._context_of = context_of
        self._lock = threading.RLock()
        self._pending = [0] * len(modules)
        self._shadows: list[tuple[Any, Any] | None] = [None] * len(modules)  # (shadow, saved forward)

    def keep(self, context: ForwardContext, index: int, replay: Replay) -> None:
        """Keep ``replay`` for the recompute of ``context``'s call of branch ``index``."""
        with self._lock:
            if index in context.kept:
                return
            if not context.kept:  # the first kept output: release all of them with the context
                weakref.finalize(context, self._release, context.kept)
            context.kept[index] = replay
            self._pending[index] += 1
            if self._shadows[index] is None:
                self._install(index)

    def discard(self, context: ForwardContext, index: int) -> None:
        """Forget a kept output (a second call of the branch made it ambiguous)."""
        with self._lock:
            if context.kept.pop(index, None) is not None:
                self._done(index)

    def _release(self, kept: dict[int, Replay]) -> None:
        with self._lock:
            for index in list(kept):
                del kept[index]
                self._done(index)

    def _done(self, index: int) -> None:
        self._pending[index] -= 1
        if self._pending[index] == 0:
            self._uninstall(index)

    def _install(self, index: int) -> None:
        module = self._modules[index]
        original = module.forward
        take = self._take

        def forward(*args: Any, **kwargs: Any) -> Any:
            replayed = take(index) if in_backward() else None
            return original(*args, **kwargs) if replayed is None else replayed[0]

        forward.__wrapped__ = original  # type: ignore[attr-defined]  # inspect.signature sees the real one
        self._shadows[index] = (forward, module.__dict__.get("forward"))
        module.forward = forward

    def _uninstall(self, index: int) -> None:
        shadow = self._shadows[index]
        if shadow is None:
            return
        self._shadows[index] = None
        module, (forward, saved) = self._modules[index], shadow
        if module.__dict__.get("forward") is not forward:  # someone replaced it since: theirs now
            return
        if saved is None:
            del module.__dict__["forward"]
        else:
            module.forward = saved

    def _take(self, index: int) -> tuple[Any] | None:
        """The kept output for this recompute, once; None to run the real forward."""
        context = self._context_of(index)
        if context is None:
            return None
        with self._lock:
            replay = context.kept.pop(index, None)
            if replay is None:
                return None
            self._done(index)
        if replay.rng_before is not None:
            # Replay only from the state the first pass started in (checkpointing's
            # preserve_rng_state), and leave the generator where the real call would have.
            now = rng_state(replay.device)
            if now is None or not _same_rng(now, replay.rng_before):
                return None
            _set_rng_state(replay.rng_after, replay.device)  # type: ignore[arg-type]
        return (_fresh_tensors(replay.output),)

    def remove(self) -> None:
        """Drop every kept output and restore every shadowed ``forward``."""
        with self._lock:
            for index in range(len(self._modules)):
                self._pending[index] = 0
                self._uninstall(index)

    def shadowed(self) -> list[bool]:
        """Per branch, whether its ``forward`` is shadowed now (for tests and benchmarks)."""
        return [s is not None for s in self._shadows]

    def pending(self) -> list[int]:
        """Per branch, how many kept outputs wait for a recompute."""
        return list(self._pending)

    def kept_bytes(self, contexts: list[ForwardContext]) -> int:
        """Bytes of the kept outputs of ``contexts`` (each storage once)."""
        storages: dict[tuple, int] = {}
        with self._lock:
            for context in contexts:
                for replay in context.kept.values():
                    values = replay.output if isinstance(replay.output, (tuple, list)) else (replay.output,)
                    for t in values:
                        if isinstance(t, torch.Tensor):
                            storage = t.untyped_storage()
                            storages[(t.device, storage.data_ptr())] = storage.nbytes()
        return sum(storages.values())


def _fresh_tensors(value: Any) -> Any:
    """``value`` with each tensor replaced by a new tensor object on the same storage.

    The kept output was computed without grad, but its tensor objects may have been given a
    ``grad_fn`` since: reentrant checkpointing sets its own node on every tensor its function
    returns, and a layer may return a branch's output directly (MPT's attention weights).
    Returned again in the recompute, that object would link the recompute's graph to the
    first pass's checkpoint node, which the backward is already running.
    """
    if isinstance(value, torch.Tensor):
        return value.detach()
    if type(value) in (tuple, list):
        return type(value)(_fresh_tensors(v) for v in value)
    return value


def make_replay(output: Any, rng_before: tuple, device: torch.device) -> Replay:
    """A :class:`Replay` of ``output``, recording RNG states only if the call drew from them."""
    rng_after = rng_state(device)
    drew = rng_after is not None and not _same_rng(rng_before, rng_after)
    return Replay(output, rng_before if drew else None, rng_after if drew else None, device)


def raise_ambiguous(branch: str, contexts: list[ForwardContext]) -> None:
    """Refuse a recompute that could belong to forwards with different drop decisions."""
    raise DropBPError(
        f"cannot tell which of {len(contexts)} pending training forwards this gradient-checkpointing "
        f"recompute of {branch} belongs to, and their masks differ; run backward before the next "
        "training forward, or use one mask for both (auto_step=False)"
    )


# ------------------------------------------------------------- reentrant checkpointing
def _uses_reentrant(function: Any) -> bool:
    """Whether a Hugging Face ``_gradient_checkpointing_func`` may checkpoint reentrantly.

    torch's ``checkpoint`` is reentrant unless told otherwise; a function of another
    library (DeepSpeed's, say) is taken to be reentrant, since nothing tells.
    """
    if function is torch.utils.checkpoint.checkpoint:
        return True
    if getattr(function, "func", None) is not torch.utils.checkpoint.checkpoint:
        return True
    return (getattr(function, "keywords", None) or {}).get("use_reentrant", True) is not False


def reentrant_checkpointing(model: nn.Module, reentrant: bool = True) -> list[nn.Module]:
    """The modules of ``model`` with Hugging Face gradient checkpointing on, reentrant (or, with
    ``reentrant=False``, non-reentrant)."""
    return [
        m for m in model.modules()
        if getattr(m, "gradient_checkpointing", False) is True
        and _uses_reentrant(getattr(m, "_gradient_checkpointing_func", torch.utils.checkpoint.checkpoint)) == reentrant
    ]


def unswitchable_checkpointing(model: nn.Module) -> str | None:
    """Name a reentrant checkpointing function that cannot be switched to non-reentrant."""
    for name, module in model.named_modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) is True and function is not None:
            if not (function is torch.utils.checkpoint.checkpoint
                    or getattr(function, "func", None) is torch.utils.checkpoint.checkpoint):
                return f"{name or type(module).__name__} checkpoints with {getattr(function, '__name__', function)!r}"
    return None


@contextlib.contextmanager
def non_reentrant_checkpointing(model: nn.Module) -> Iterator[None]:
    """Within this block, Hugging Face reentrant gradient checkpointing runs non-reentrant.

    Reentrant checkpointing cannot run ``torch.autograd.grad``, which the sensitivity
    measurement needs; both variants compute the same values. PEFT's
    ``prepare_model_for_kbit_training`` turns reentrant checkpointing on by default.

    Raises:
        DropBPError: If a module checkpoints with a function other than torch's.
    """
    switched = reentrant_checkpointing(model)
    if not switched:
        yield
        return
    problem = unswitchable_checkpointing(model)
    if problem is not None:
        raise DropBPError(
            f"sensitivity needs torch.autograd.grad, which reentrant gradient checkpointing does not support, "
            f"and {problem}; enable checkpointing with gradient_checkpointing_kwargs={{'use_reentrant': False}} "
            "or keep the rates uniform (sensitivity_at=None)"
        )
    saved = [m.__dict__.get("_gradient_checkpointing_func") for m in switched]
    for module in switched:
        keywords = dict(getattr(module._gradient_checkpointing_func, "keywords", None) or {})
        module._gradient_checkpointing_func = functools.partial(
            torch.utils.checkpoint.checkpoint, **{**keywords, "use_reentrant": False}
        )
    try:
        yield
    finally:
        for module, function in zip(switched, saved):
            if function is None:
                del module._gradient_checkpointing_func
            else:
                module._gradient_checkpointing_func = function
