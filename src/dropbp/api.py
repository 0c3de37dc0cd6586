"""``dropbp.apply``: one config in, a handle out; the top of the core.

It checks what cannot be made exact before anything is attached (a compiled model, a DDP
wrapper without ``find_unused_parameters``, DropBP applied twice), attaches the handle
(:func:`dropbp.handle.attach_handle`), sets the schedule, and for an architecture outside the
table verifies the generic fallback's branches on a tiny random copy of the model
(:mod:`dropbp.verify`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dropbp.config import DropBPConfig
from dropbp.distributed import require_find_unused
from dropbp.errors import COMPILE_REFUSED, DropBPError
from dropbp.handle import DropBPHandle, attach_handle, find_handle
from dropbp.verify import verify_fallback_on_a_tiny_copy

__all__ = ["apply"]

_NUMBER = (int, float)


def apply(
    model: nn.Module,
    config: DropBPConfig | float | None = None,
    *,
    drop_rate: float | None = None,
    seed: int | None = None,
    branches: Sequence[str] | None = None,
    auto_step: bool | None = None,
    replay: bool | None = None,
    schedule: str | Callable[[int], float] | None = None,
    total_steps: int | None = None,
    mask: Literal["random", "structured"] | None = None,
    check_ranks: bool = False,
) -> DropBPHandle:
    """Attach DropBP to a model.

    ``dropbp.apply(model, DropBPConfig(...))`` and ``dropbp.apply(model, drop_rate=0.5, ...)``
    are the same call; keywords given beside a config override its fields. The handle keeps
    the resulting config as :attr:`DropBPHandle.config`, and :meth:`DropBPHandle.calibrate`
    takes its allocation settings from it.

    Args:
        model: The model to train (a transformers model, a ``PeftModel`` or any module).
        config: A :class:`~dropbp.DropBPConfig` (default: ``DropBPConfig()``). A number is taken
            as ``drop_rate``, as in ``dropbp.apply(model, 0.5)``.
        drop_rate: Drop rate of every branch, in ``[0, 1)`` (``config.drop_rate``).
        seed: Mask seed; use the same on every data-parallel rank (``config.seed``).
        branches: fnmatch patterns over ``model.named_modules()`` names selecting the
            residual branch modules (``config.branches``). ``None`` auto-detects known
            architectures; for other Hugging Face models the generic fallback's branches are
            first verified on a tiny random copy of the model
            (:func:`dropbp.verify.verify_fallback_on_a_tiny_copy`).
        auto_step: If True, every forward of ``model`` in training mode with grad enabled
            samples the next mask, so a manual loop needs nothing else (``config.auto_step``).
        replay: Under gradient checkpointing, return each dropped branch's first-pass output
            in the backward's recompute instead of running the branch again (``config.replay``).
            Exact (dropout draws included); saves the dropped branches' forward FLOPs in the
            recompute at the cost of keeping their outputs until it.
        schedule: A drop-rate schedule of the mask step: a spec such as ``"cooldown:0.2"``
            or ``"linear:0.5:0"`` (``config.drop_schedule``), or a callable ``step -> rate``
            (see :meth:`DropBPHandle.set_schedule`).
        total_steps: Mask steps in the run, for the fraction-based specs.
        mask: ``"random"`` (each branch dropped at its rate) or ``"structured"`` (every branch
            below a random cut, so kept branches get exact gradients; see
            :func:`dropbp.masks.sample_structured_mask`) (``config.mask``).
        check_ranks: Debug option for data-parallel runs: at every step, one all_gather
            checks that all ranks drew the same mask (they do by construction when seeds,
            rates and step counters agree).

    Returns:
        The :class:`DropBPHandle`; ``handle.remove()`` undoes everything.

    Raises:
        ValueError: On a bad setting (see :class:`~dropbp.DropBPConfig`), patterns that match
            nothing or nested branches, an unknown architecture without ``branches=``, a model
            that already has DropBP, a ``DistributedDataParallel`` wrapper without
            ``find_unused_parameters=True`` (also detected at the first training forward when
            DropBP is applied to the inner model), a ``torch.compile``-d model, or a branch that
            adds the residual inside (it takes the residual as an argument, or is a whole
            decoder layer).
        DropBPError: If the generic fallback's branches fail the structural checks on a
            tiny copy of the model (they would cut the residual stream).
        RuntimeError: At the first training forward compiled by ``torch.compile`` (the whole
            model or any layer holding a branch): DropBP's per-step masks cannot live in a
            compiled graph. Compiled forwards in eval mode or under ``no_grad`` are fine.
    """
    config = _merged_config(config, drop_rate=drop_rate, seed=seed, branches=branches, auto_step=auto_step,
                            replay=replay, drop_schedule=schedule if isinstance(schedule, str) else None, mask=mask)
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not loaded: nothing can be compiled yet
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        raise DropBPError(COMPILE_REFUSED)
    if isinstance(model, DistributedDataParallel):
        require_find_unused(model)
    if find_handle(model) is not None:
        raise ValueError("DropBP is already applied to this model; call handle.remove() before applying again")
    handle = attach_handle(model, config.branches, seed=config.seed, auto_step=config.auto_step,
                     drop_rate=config.drop_rate, check_ranks=check_ranks, replay=config.replay,
                     mask_mode=config.mask)
    handle.config = config
    try:
        handle.set_schedule(schedule if callable(schedule) else config.drop_schedule, total_steps)
    except ValueError:
        handle.remove()
        raise
    if handle.branch_source == "fallback":
        try:
            verify_fallback_on_a_tiny_copy(model)
        except DropBPError:
            handle.remove()
            raise
    return handle


def _merged_config(config: DropBPConfig | float | None, **overrides: Any) -> DropBPConfig:
    """``config`` (a DropBPConfig, a drop rate or None) with the given non-None fields replaced, validated."""
    if isinstance(config, _NUMBER) and not isinstance(config, bool):
        if overrides.get("drop_rate") is not None:
            raise ValueError("pass the drop rate once: as apply's second argument or as drop_rate=, not both")
        config, overrides["drop_rate"] = None, config
    elif config is not None and not isinstance(config, DropBPConfig):
        raise ValueError(f"config must be a dropbp.DropBPConfig or a drop rate, got {type(config).__name__}")
    changes = {name: value for name, value in overrides.items() if value is not None}
    # replace() runs DropBPConfig's validation on the merged fields.
    return dataclasses.replace(config or DropBPConfig(), **changes)
