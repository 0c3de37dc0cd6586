"""The no-grad branch mechanism: forward pre/post hooks on existing modules.

A dropped branch runs its forward with grad mode off, so autograd builds no graph for it
and saves none of its activations; its output enters the residual add as a constant, and
the gradient flows through the skip path only. Nothing is wrapped or renamed: the module
tree, ``state_dict()`` keys and ``forward``'s signature stay as they were. The one
short-lived exception is the gradient-checkpointing replay (:func:`install_replay`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dropbp.validation import check_rate

__all__ = [
    "Branch", "Replay", "clear_replay", "first_input", "first_tensor", "in_backward", "install_replay", "register",
    "replace_first_tensor", "rng_state", "shape_key", "unregister",
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
        flops: FLOPs of one forward of this branch at the last input shape it saw, counted
            with ``torch.utils.flop_counter``; ``None`` until it has run once.
    """

    name: str
    module: nn.Module
    index: int
    end_module: nn.Module | None = None
    modules: tuple[nn.Module, ...] = ()
    flops: int | None = None
    _drop_rate: float = 0.0
    _flops_by_shape: dict[tuple, int] = field(default_factory=dict, repr=False)
    _frames: list = field(default_factory=list, repr=False)
    _handles: list[RemovableHandle] = field(default_factory=list, repr=False)
    _replay: Replay | None = field(default=None, repr=False)
    _replay_blocked: bool = field(default=False, repr=False)

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


def _walk(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                yield item


def shape_key(args: tuple, kwargs: dict) -> tuple:
    """Shapes of the tensor inputs (one level into tuples): FLOPs change only with these."""
    key = [tuple(t.shape) for a in args for t in _walk(a)]
    key += [(k, tuple(t.shape)) for k, v in kwargs.items() for t in _walk(v)]
    return tuple(key)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a branch adds to the residual stream: itself, or the first of a tuple.

    Hugging Face attention returns ``(output, weights)`` and MoE blocks
    ``(output, router_logits)``; the first element is the residual contribution.
    """
    if isinstance(value, torch.Tensor):
        return value
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
    return type(value)([tensor, *value[1:]]) if isinstance(value, list) else (tensor, *value[1:])


# -------------------------------------------------------------- checkpoint replay
@dataclass
class Replay:
    """A dropped branch's first-pass output, kept for the gradient-checkpointing recompute.

    Attributes:
        output: What the branch returned in the first pass.
        rng_before: RNG states before that call, or ``None`` if the call drew no random numbers.
        rng_after: RNG states after that call (``None`` likewise).
        saved_forward: An instance-level ``forward`` someone else had set, to restore.
        shadow: The ``forward`` installed in its place.
    """

    output: Any
    rng_before: tuple[torch.Tensor, ...] | None
    rng_after: tuple[torch.Tensor, ...] | None
    saved_forward: Any = None
    shadow: Any = None


def in_backward() -> bool:
    """True while the autograd engine runs a backward (where checkpointing recomputes)."""
    return torch._C._current_graph_task_id() != -1


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


def install_replay(
    branch: Branch, output: Any, rng_before: tuple[torch.Tensor, ...], rng_after: tuple[torch.Tensor, ...],
    device: torch.device,
) -> None:
    """Make the branch's next call inside a backward return ``output`` instead of running.

    Gradient checkpointing recomputes a layer's forward in backward. A dropped branch's
    output is a constant there, so recomputing it is wasted work: it is kept instead (one
    tensor the size of the branch output until the recompute). A forward pre-hook cannot
    skip the forward, so the module's ``forward`` is shadowed by an instance attribute
    until the replay, the next training forward or ``remove()``.

    The replay is exact: if the branch drew random numbers (dropout), the RNG is moved to
    where the recomputed call would have left it, and only when the recompute starts from
    the state the first pass started from (checkpointing's ``preserve_rng_state``);
    otherwise the real forward runs. A branch called twice in one forward is not replayed.
    """
    if branch._replay_blocked:
        return
    if branch._replay is not None:  # which call a recompute would replay is ambiguous
        clear_replay(branch)
        branch._replay_blocked = True
        return
    module = branch.module
    drew = not _same_rng(rng_before, rng_after)
    replay = Replay(output, rng_before if drew else None, rng_after if drew else None, module.__dict__.get("forward"))
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if branch._replay is not replay or not in_backward():
            return original(*args, **kwargs)
        clear_replay(branch)
        if replay.rng_before is not None:
            now = rng_state(device)
            if now is None or not _same_rng(now, replay.rng_before):
                return original(*args, **kwargs)
            _set_rng_state(replay.rng_after, device)
        return replay.output

    forward.__wrapped__ = original  # type: ignore[attr-defined]  # inspect.signature sees the real one
    replay.shadow = forward
    module.forward = forward
    branch._replay = replay


def clear_replay(branch: Branch, unblock: bool = False) -> None:
    """Drop a kept output and restore the module's own ``forward``."""
    replay, branch._replay = branch._replay, None
    if unblock:
        branch._replay_blocked = False
    if replay is None:
        return
    module = branch.module
    if module.__dict__.get("forward") is not replay.shadow:  # someone replaced it since: theirs now
        return
    if replay.saved_forward is None:
        del module.__dict__["forward"]
    else:
        module.forward = replay.saved_forward


def register(
    branch: Branch,
    pre: Callable[[Branch, nn.Module, tuple, dict], None],
    post: Callable[[Branch, nn.Module, tuple, Any], Any],
) -> None:
    """Attach ``pre`` to the branch's first module and ``post`` to its last.

    The post-hook is registered with ``always_call=True`` so grad mode is restored even
    when the branch's forward raises.
    """
    branch._handles.append(
        branch.module.register_forward_pre_hook(lambda m, a, k: pre(branch, m, a, k), with_kwargs=True)
    )
    branch._handles.append(
        branch.end_module.register_forward_hook(lambda m, a, o: post(branch, m, a, o), always_call=True)
    )


def unregister(branch: Branch) -> None:
    """Remove every hook :func:`register` attached to the branch."""
    for handle in branch._handles:
        handle.remove()
    branch._handles.clear()
    branch._frames.clear()
    clear_replay(branch, unblock=True)
