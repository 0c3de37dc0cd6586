"""DeepSpeed ZeRO: what DropBP does under each stage, and what it refuses.

A dropped branch's parameters get no gradient in that step. Plain PyTorch, DDP and ZeRO-1/2
handle that exactly. DeepSpeed 0.19's ZeRO-3 does not: it keeps every parameter's gradient
partition in one persistent flat buffer that a backward writes only for the parameters that
got a gradient, and the optimizer step reads the whole buffer. A parameter without a gradient
this step is therefore updated again with the last gradient it had. With optimizer offload
(ZeRO-2 or ZeRO-3) the same holds for the fp32 gradient partitions on the CPU. So, once per
optimizer, DropBP wraps the ZeRO optimizer's ``step`` and zeroes those buffers after each
step: a parameter that gets no gradient in a step then gets a zero gradient, which is what
ZeRO-1/2 give it (with SGD, no update; optimizers with momentum or weight decay still move
it, as they would in plain PyTorch with a zero gradient).

What stays refused, with a one-line :class:`~dropbp.DropBPError` at the first training
forward under the engine (the Trainer callback refuses the ZeRO-3 cases at train begin):

- Optimizer offload with gradient accumulation and a new mask per micro-batch: DeepSpeed
  copies a partition to the offloaded fp32 gradients only for parameters that get a gradient
  in the window's last micro-batch, so a gradient from an earlier micro-batch would be lost.
  One mask per optimizer step (``auto_step=False``) keeps every parameter's micro-batches
  alike, which is exact.
- NVMe optimizer offload (the swapped gradients are not reachable to zero).
- ZeRO-3 with non-reentrant gradient checkpointing: DeepSpeed re-partitions the parameters of
  a branch that ran without grad while the recompute still needs them ("The size of tensor a
  (0) must match ..."). Reentrant checkpointing works and is exact.
- Sensitivity under ZeRO-3 (parameters are partitioned; ``torch.autograd.grad`` cannot see
  them whole). ZeRO-1/2 keep whole parameters on every rank and are measured exactly.

Two ways in. Explicitly, ``dropbp.zero.guard(engine)`` right after ``deepspeed.initialize``
refuses what cannot be exact and installs the step wrapper at once. Otherwise the engine is
found on the call stack of the first training forward (DeepSpeed calls the model from
``DeepSpeedEngine.forward``), so this works the same whether the engine was built by
``deepspeed.initialize``, Accelerate or the Hugging Face Trainer, and whether
:func:`dropbp.apply` ran before or after it. ``handle.remove()`` restores the optimizers'
own ``step`` either way.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dropbp.callstack import calling_instance
from dropbp.checkpointing import reentrant_checkpointing
from dropbp.errors import ZERO3_NON_REENTRANT_REFUSED, ZERO3_SENSITIVITY_REFUSED, DropBPError

__all__ = [
    "active_engine", "guard", "guard_engine", "is_zero3_model", "refuse_zero3", "release_guards",
]

_STACK_DEPTH = 40  # DeepSpeedEngine.forward is a few frames above the model's forward hooks


def is_zero3_model(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are partitioned by DeepSpeed ZeRO-3 (``zero.Init`` or the engine)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def active_engine() -> Any | None:
    """The ``DeepSpeedEngine`` whose ``forward`` is on this thread's call stack, or None."""
    engine_module = sys.modules.get("deepspeed.runtime.engine")  # not imported: no engine can exist
    if engine_module is None:
        return None
    return calling_instance(engine_module.DeepSpeedEngine, _STACK_DEPTH, function="forward")



def refuse_zero3(model: nn.Module, sensitivity: bool) -> None:
    """At train begin: refuse ZeRO-3 with non-reentrant checkpointing, and with a sensitivity measurement.

    Raises:
        DropBPError: If ``model`` is partitioned by ZeRO-3 and either applies.
    """
    if not is_zero3_model(model):
        return
    if reentrant_checkpointing(model, reentrant=False):
        raise DropBPError(ZERO3_NON_REENTRANT_REFUSED)
    if sensitivity:
        raise DropBPError(ZERO3_SENSITIVITY_REFUSED)


def _stale_gradient_buffers(optimizer: Any, stage: int, offload: bool) -> Callable[[], list[torch.Tensor]]:
    """A function returning the gradient buffers that ``optimizer`` keeps across steps and must be zeroed.

    Raises:
        DropBPError: If this DeepSpeed's ZeRO optimizer does not have the buffers this version knows.
    """
    if stage == 3:
        if not hasattr(optimizer, "grad_partitions_flat_buffer") or (
            offload and not hasattr(optimizer, "fp32_partitioned_groups_flat")
        ):
            raise DropBPError(_unknown_optimizer(optimizer))

        def buffers() -> list[torch.Tensor]:
            found = [optimizer.grad_partitions_flat_buffer]
            if offload:
                found += [flat.grad for flat in optimizer.fp32_partitioned_groups_flat if flat.grad is not None]
            return [b for b in found if b is not None]

        return buffers
    if not hasattr(optimizer, "single_partition_of_fp32_groups"):
        raise DropBPError(_unknown_optimizer(optimizer))
    return lambda: [flat.grad for flat in optimizer.single_partition_of_fp32_groups if flat.grad is not None]


def _unknown_optimizer(optimizer: Any) -> str:
    return (
        f"DeepSpeed's {type(optimizer).__name__} does not keep its gradient partitions where DeepSpeed 0.19 does, so "
        "DropBP cannot keep dropped parameters from reusing a stale gradient; use deepspeed 0.19.x or ZeRO-1/2 "
        "without offload"
    )


class _ZeroingStep:
    """The ZeRO optimizer's ``step``, followed by zeroing the gradient buffers it keeps across steps."""

    def __init__(self, optimizer: Any, buffers: Callable[[], list[torch.Tensor]]):
        self.optimizer = optimizer
        self.buffers = buffers
        self.step = optimizer.step  # the bound method of the class; our attribute shadows it

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.step(*args, **kwargs)
        # Also after a step skipped for fp16 overflow: that window's gradients are discarded either way.
        with torch.no_grad():
            for buffer in self.buffers():
                buffer.zero_()
        return result

    def restore(self) -> None:
        if self.optimizer.__dict__.get("step") is self:
            del self.optimizer.step


#: The step wrappers installed, per module the engine runs; a weak key, so no model is kept alive.
_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def guard(engine: Any, auto_step: bool | None = None) -> None:
    """Make DropBP exact under a DeepSpeed engine now, or refuse it (the explicit form of the detection).

    Call it after ``deepspeed.initialize`` (DropBP may be applied before or after). Without
    it, the same happens at the first training forward through the engine.

    Args:
        engine: The ``DeepSpeedEngine``.
        auto_step: The handle's ``auto_step``, if known: optimizer offload with gradient
            accumulation is refused with a new mask per micro-batch. None leaves that one
            check to the first training forward, which knows the handle.

    Raises:
        DropBPError: For the combinations listed in the module docstring.
        ValueError: If ``engine`` is not a DeepSpeed engine.
    """
    if not callable(getattr(engine, "zero_optimization_stage", None)) or not isinstance(
        getattr(engine, "module", None), nn.Module
    ):
        raise ValueError(f"dropbp.zero.guard needs the engine deepspeed.initialize returned, got {type(engine).__name__}")
    guard_engine(engine, engine.module, auto_step)


def guard_engine(engine: Any, model: nn.Module, auto_step: bool | None) -> None:
    """Refuse what cannot be exact under ``engine``; make the rest exact (see :func:`guard`).

    Args:
        engine: The ``DeepSpeedEngine`` running ``model``.
        model: The module DropBP is applied to.
        auto_step: Whether every micro-batch samples its own mask; None (not known yet) skips the
            check of offload with gradient accumulation, which depends on it.

    Raises:
        DropBPError: For the combinations listed in the module docstring.
    """
    stage = int(engine.zero_optimization_stage())
    optimizer = getattr(engine, "optimizer", None)
    offload_config = engine.zero_offload_optimizer() if stage else None
    device = str(getattr(getattr(offload_config, "device", None), "value", getattr(offload_config, "device", "")))
    offload = device in ("cpu", "nvme")
    if stage == 3 and reentrant_checkpointing(model, reentrant=False):
        raise DropBPError(ZERO3_NON_REENTRANT_REFUSED)
    if device == "nvme":
        raise DropBPError(
            "DropBP cannot zero the gradients DeepSpeed swaps to NVMe, so dropped parameters would reuse a stale "
            "gradient; offload the optimizer to the CPU (offload_optimizer.device='cpu') or not at all"
        )
    if offload and auto_step and engine.gradient_accumulation_steps() > 1:
        raise DropBPError(
            "DeepSpeed optimizer offload keeps a parameter's gradient only from the last micro-batch it got one in, "
            "so a new DropBP mask per micro-batch loses gradients under gradient accumulation; use one mask per "
            "optimizer step: DropBPCallback(auto_step=False), or dropbp.apply(..., auto_step=False) and "
            "handle.step() before each optimizer step"
        )
    if optimizer is None or (stage < 3 and not offload):
        return  # ZeRO-0/1/2 without offload leave a parameter without gradient at zero
    if isinstance(optimizer.__dict__.get("step"), _ZeroingStep):
        return
    wrapper = _ZeroingStep(optimizer, _stale_gradient_buffers(optimizer, stage, offload))
    optimizer.step = wrapper
    _GUARDS.setdefault(engine.module, []).append(wrapper)


def release_guards(model: nn.Module) -> None:
    """Restore the own ``step`` of the ZeRO optimizers guarded for ``model`` (``handle.remove()``).

    The guards of every engine whose module is ``model``, holds it or is held by it.
    """
    inside = set(map(id, model.modules()))
    for module in list(_GUARDS.keys()):
        if id(module) in inside or any(m is model for m in module.modules()):
            for wrapper in _GUARDS.pop(module):
                wrapper.restore()
