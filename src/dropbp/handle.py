"""The handle: the public, stateful shell over one model's branch table, mask stream and hooks.

:func:`dropbp.apply` (in :mod:`dropbp.api`) builds it. Everything it holds lives in the
layers below: the rates, seed and step in the :class:`~dropbp.masks.MaskStream`, the branches
in the :class:`~dropbp.branches.BranchTable`, the per-forward routing in
:class:`~dropbp.forwards.Forwards`, the hooks in :mod:`dropbp.hooks`; the handle wires them
together and offers the API (steps, rates, schedules, sensitivity, allocation, state).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from dropbp import hooks
from dropbp.allocation import allocate_drop_rates, flops_weighted_rate
from dropbp.architectures import BranchSpec, branch_source, resolve_branches
from dropbp.branches import Branch, BranchTable
from dropbp.calibration import measure_sensitivity
from dropbp.config import DropBPConfig
from dropbp.distributed import assert_same_on_all_ranks
from dropbp.flops import FlopMeter
from dropbp.forwards import Forwards
from dropbp.masks import MaskStream
from dropbp.schedules import DropSchedule
from dropbp.sensitivity import Metric
from dropbp.validation import check_int, check_mask, check_nonnegative, check_rate, check_rates
from dropbp.zero import release_guards

__all__ = ["DropBPHandle", "attach_handle", "find_handle"]

STATE_VERSION = 1
_STATE_KEYS = ("version", "branches", "seed", "step", "drop_rates")


class DropBPHandle:
    """DropBP attached to one model. Created by :func:`dropbp.apply`; not constructed directly.

    The handle owns the mask stream (``seed``, step counter, rates), the per-branch hooks
    and the per-run bookkeeping. Each training forward of ``model`` takes its mask from
    the stream when it starts (see :mod:`dropbp.hooks`); everything that forward's
    recompute needs stays with that forward, so several forwards may wait for their
    backward at once, in any order.

    Attributes:
        branches: The residual branches in execution order.
        model: The module DropBP was applied to.
        sensitivities: The last sensitivities measured or loaded, else ``None``.
        branch_source: Where the branches came from: ``"table"`` (the architecture table),
            ``"fallback"`` (the generic rule) or ``"patterns"`` (``branches=``).
        entry_modules: ``model`` and the modules inside it that hold every branch, outermost
            first: a training forward of any of them draws its own mask.
        check_ranks: Whether every step checks that all data-parallel ranks drew the same mask.
        config: The settings :func:`dropbp.apply` was given (None for a handle built
            otherwise); :meth:`calibrate` reads them.
    """

    def __init__(
        self, model: nn.Module, specs: list[BranchSpec], seed: int, auto_step: bool, drop_rate: float,
        check_ranks: bool = False, replay: bool = True, mask_mode: str = "random",
    ):
        self.model = model
        self.stream = MaskStream(len(specs), seed, drop_rate, mask_mode)
        self.table = BranchTable(model, specs, self.stream)
        self.branches: list[Branch] = self.table.branches
        self.entry_modules = self.table.entry_modules
        self.check_ranks = bool(check_ranks)
        self.sensitivities: list[float] | None = None
        self.config: DropBPConfig | None = None
        # "table", "fallback" or "patterns": fallback branches are verified on the first batch by the
        # callback and dropbp finetune (dropbp.verify.require_sound_branches).
        self.branch_source = "patterns"
        self.meter = FlopMeter(len(self.branches), param_counts=[sum(p.numel() for p in b.parameters())
                                                                 for b in self.branches],
                               names=[b.name for b in self.branches])
        self.routing = Forwards(model, self.table, self.stream, self.meter, self._draw, bool(auto_step), bool(replay))
        self._hook_handles = self._register_hooks()

    def _register_hooks(self) -> list:
        routing, handles = self.routing, []
        # Entry modules first, so their pre-hooks open the forward before anything inside it records.
        for depth, module in enumerate(self.entry_modules):
            entry = hooks.EntryHook(routing, module, depth, owner=self)
            handles += hooks.register(module, pre=entry.pre, post=entry.post)
        for module, indices in self.table.covers:  # before the branch hooks: a recompute is matched first
            handles += hooks.register(module, pre=hooks.KeyHook(routing, indices, owner=self))
        for branch in self.branches:
            hook = hooks.BranchHook(routing, branch.index, owner=self)
            handles += hooks.register(branch.module, pre=hook.pre)
            handles += hooks.register(branch.end_module, post=hook.post)
        return handles

    # ---------------------------------------------------------------- settings
    @property
    def seed(self) -> int:
        """Seed of the mask stream."""
        return self.stream.seed

    @property
    def auto_step(self) -> bool:
        """Whether each training forward of ``model`` samples the next mask."""
        return self.routing.auto_step

    @auto_step.setter
    def auto_step(self, value: bool) -> None:
        self.routing.auto_step = bool(value)

    @property
    def replay(self) -> bool:
        """Under gradient checkpointing, return a dropped branch's first-pass output in the recompute
        instead of running the branch again (exact; saves its FLOPs)."""
        return self.routing.replay

    @replay.setter
    def replay(self, value: bool) -> None:
        self.routing.replay = bool(value)

    @property
    def mask_mode(self) -> str:
        """``"random"`` or ``"structured"`` (see :mod:`dropbp.masks`)."""
        return self.stream.mode

    @property
    def schedule(self) -> DropSchedule | Callable[[int], float] | None:
        """The drop-rate schedule (None: constant rates)."""
        return self.stream.schedule

    @property
    def total_steps(self) -> int | None:
        """Mask steps in the run, for a schedule."""
        return self.stream.total_steps

    # ------------------------------------------------------------------ masks
    @property
    def step_count(self) -> int:
        """Number of masks sampled so far; the next :meth:`step` samples mask ``step_count``."""
        return self.stream.step

    @property
    def mask(self) -> list[bool]:
        """The mask in force (True = that branch's backward is dropped)."""
        return list(self.stream.mask)

    def step(self) -> list[bool]:
        """Sample the mask for the next forward/backward and advance the step counter.

        Returns:
            The new mask, one bool per branch.
        """
        return list(self._draw())

    def _draw(self) -> tuple[bool, ...]:
        step, mask = self.stream.advance()
        if self.check_ranks:
            assert_same_on_all_ranks(step, list(mask))
        return mask

    def drop_statistics(self, reset: bool = True) -> dict[str, float]:
        """What the masks sampled since the last reset actually dropped.

        Args:
            reset: Start a new tally after reading.

        Returns:
            ``steps`` (masks sampled), ``drop_rate`` (mean fraction of branches dropped)
            and ``backward_flops_skipped`` (mean fraction of branch backward FLOPs skipped;
            NaN while FLOPs are unknown). Empty values are 0. Once a training forward has
            run, branches it never called are left out of both.
        """
        steps, counts = self.stream.tally(reset)
        stats = {"steps": float(steps), "drop_rate": 0.0, "backward_flops_skipped": 0.0}
        # Once training forwards have run, a branch they never call is left out: dropping it skips nothing.
        ran = [i for i, f in enumerate(self.flops) if f is not None] or list(range(len(self.branches)))
        if steps and self.branches:
            stats["drop_rate"] = sum(counts[i] for i in ran) / (steps * len(ran))
            flops = [self.flops[i] for i in ran]
            if any(f is None for f in flops):
                stats["backward_flops_skipped"] = float("nan")
            else:
                stats["backward_flops_skipped"] = flops_weighted_rate([counts[i] / steps for i in ran], flops)
        return stats

    def set_mask(self, mask: Sequence[bool]) -> None:
        """Force a mask for the next forward without advancing the step counter.

        With ``auto_step=True`` the next training forward replaces it; use
        ``auto_step=False`` (or :meth:`paused`) to keep a forced mask.

        Raises:
            ValueError: If the mask length differs from the number of branches.
        """
        self.stream.set_mask(mask)

    @property
    def drop_rates(self) -> list[float]:
        """Per-branch drop rates, in execution order."""
        return list(self.stream.rates)

    def set_drop_rates(self, rates: Sequence[float] | float, target: float | None = None) -> None:
        """Set the per-branch drop rates (a single number sets them all).

        Args:
            rates: One rate per branch, or one rate for all.
            target: The rate these rates realise, which a drop schedule scales (see
                :meth:`set_schedule`); default: the single rate, or the rates' mean.

        Raises:
            ValueError: On a wrong length or a rate that is NaN or outside ``[0, 1)``.
        """
        self.stream.set_rates(rates, target)

    def set_schedule(self, schedule: str | Callable[[int], float] | None, total_steps: int | None = None) -> None:
        """Let the drop rate follow a schedule of the mask step (see :mod:`dropbp.schedules`).

        The rates at step ``t`` are the per-branch rates scaled by ``rate(t) / target``, so
        masks stay a pure function of ``(seed, t, rates at t)`` and a resumed run continues
        exactly.

        Args:
            schedule: A spec (``"constant"``, ``"warmup:F"``, ``"cooldown:F"``, ``"linear:A:B"``,
                ``"cosine:A:B"``), a callable ``step -> rate``, or None for constant rates.
            total_steps: Mask steps in the run (training forwards with ``auto_step=True``,
                :meth:`step` calls otherwise); needed by every spec but ``"constant"``.

        Raises:
            ValueError: On a bad spec, or a spec that needs ``total_steps`` without it.
        """
        self.stream.set_schedule(schedule, total_steps)

    def rates_at(self, step: int) -> list[float]:
        """The per-branch rates in force at mask step ``step`` (the schedule applied)."""
        return self.stream.rates_at(step)

    @property
    def kept_for_replay(self) -> list[int]:
        """Per branch, how many first-pass outputs wait for a checkpoint recompute to replay them."""
        return self.routing.replays.pending()

    def kept_for_replay_bytes(self) -> int:
        """Bytes held by the outputs kept for checkpoint replays (each storage counted once)."""
        return self.routing.replays.kept_bytes(self.routing.keys.live_contexts())

    def implausible_flops(self) -> list[str]:
        """Names of the branches whose counted FLOPs are far below ``2 x parameters x tokens``.

        Such a count (see :func:`dropbp.flops.implausible_flops`) means torch's FLOP counter
        missed the branch's main kernel; it was also reported with a ``DropBPFlopWarning``.
        """
        return [self.branches[i].name for i in sorted(self.meter.implausible)]

    @property
    def flops(self) -> list[int | None]:
        """Per-branch forward FLOPs at the last training input shape (``None`` before one)."""
        return [b.flops for b in self.branches]

    def dropped_flops_fraction(self, mask: Sequence[bool] | None = None) -> float:
        """Fraction of branch FLOPs whose backward a mask skips (the expected one if ``None``).

        Raises:
            ValueError: If FLOPs are unknown because no forward has run yet.
        """
        flops = self._known_flops()
        rates = self.drop_rates if mask is None else [float(m) for m in check_mask(mask, len(flops))]
        return flops_weighted_rate(rates, flops)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within this block, training forwards neither drop branches nor advance the masks."""
        with self.stream.forced([False] * len(self.branches)):
            yield

    def forced(self, mask: Sequence[bool]) -> contextlib.AbstractContextManager[None]:
        """Within this block, every training forward uses ``mask`` and the mask stream stays put.

        Raises:
            ValueError: If the mask length differs from the number of branches.
        """
        return self.stream.forced(mask)

    # ------------------------------------------------------------ sensitivity
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the model that require grad (tied weights once)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def sensitivity(
        self,
        closure: Callable[[], torch.Tensor],
        metric: Metric = "grad_diff",
        method: Literal["fast", "naive"] = "fast",
    ) -> list[float]:
        """Measure each branch's sensitivity ``S_l = ||G - G_{-l}||^2`` on one batch.

        No ``.grad`` is touched, the optimizer is not involved, the mask stream does not
        advance, and the current mask is restored afterwards. The result is also kept in
        :attr:`sensitivities`. Under ``torch.distributed`` every rank must call this; the
        result is averaged over ranks so that all of them allocate the same rates.
        Under FSDP2 (``fully_shard``) the parameters are gathered for the measurement (each
        rank then holds the whole model for its duration); FSDP1 is refused.

        Args:
            closure: Runs one forward of the model in training mode on a fixed batch and
                returns the scalar loss. It must not call ``backward``.
            metric: ``"grad_diff"`` (default) or ``"grad_norm_diff"`` (the paper code's
                sum of squared differences of per-parameter gradient norms).
            method: ``"fast"``: one forward, one backward, and a partial backward per
                branch (exact). ``"naive"``: ``L + 1`` forward/backward passes, for checking.

        Returns:
            One sensitivity per branch, in execution order.

        Raises:
            ValueError: If the model has no trainable parameters or is wrapped by FSDP1, the
                closure's loss is not a differentiable scalar, or ``method`` is unknown (or
                not ``"fast"`` under FSDP2).
            DropBPError: Under reentrant gradient checkpointing that is not torch's own
                ``checkpoint`` (which is switched to non-reentrant for the measurement).
        """
        result = measure_sensitivity(self.routing, closure, metric, method)
        self.sensitivities = result
        return list(result)

    def calibrate(
        self,
        closures: Sequence[Callable[[], torch.Tensor]],
        target: float | None = None,
        max_rate: float | None = None,
        allocation: Literal["exact", "greedy"] | None = None,
        metric: Metric | None = None,
    ) -> list[float]:
        """Measure sensitivity averaged over several batches, then allocate rates for ``target``.

        Settings left None come from :attr:`config` (``drop_rate``, ``max_rate``, ``allocation``,
        ``sensitivity_metric``), or from :class:`~dropbp.DropBPConfig`'s defaults.

        Args:
            closures: One loss closure per batch (see :meth:`sensitivity`).
            target: Fraction of branch FLOPs whose backward is dropped on average.
            max_rate: Upper bound on any one rate.
            allocation: ``"exact"`` or ``"greedy"``.
            metric: Sensitivity metric.

        Returns:
            The new per-branch rates.

        Raises:
            ValueError: If ``closures`` is empty, or as :meth:`sensitivity` and :meth:`allocate`.
        """
        config = self.config or DropBPConfig()
        target = config.drop_rate if target is None else target
        max_rate = config.max_rate if max_rate is None else max_rate
        allocation = config.allocation if allocation is None else allocation
        metric = config.sensitivity_metric if metric is None else metric
        if not closures:
            raise ValueError("calibrate needs at least one batch closure")
        total = [0.0] * len(self.branches)
        for closure in closures:
            total = [a + b for a, b in zip(total, self.sensitivity(closure, metric=metric))]
        averaged = [v / len(closures) for v in total]
        return self.allocate(target, averaged, max_rate=max_rate, method=allocation)

    # ------------------------------------------------------------- allocation
    def _known_flops(self) -> list[int]:
        missing = [b.name for b in self.branches if b.flops is None]
        if missing and len(missing) < len(self.branches):
            others = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(
                f"branch {missing[0]!r}{others} never ran in the training forwards so far, so it has no FLOPs to "
                "allocate by; pass branches= patterns that match only the branches the forward calls"
            )
        if missing:
            raise ValueError(
                f"FLOPs of {len(missing)} branches are unknown (e.g. {missing[0]}); "
                "run one training forward of the model (or handle.sensitivity) first"
            )
        return [b.flops for b in self.branches]  # type: ignore[misc]

    def allocate(
        self,
        target: float,
        sensitivity: Sequence[float] | None = None,
        max_rate: float = 0.9,
        method: Literal["exact", "greedy"] = "exact",
    ) -> list[float]:
        """Set the drop rates from :func:`dropbp.allocate_drop_rates` and return them.

        Args:
            target: Fraction of branch FLOPs whose backward is dropped on average.
            sensitivity: Per-branch sensitivities; ``None`` uses :attr:`sensitivities`.
            max_rate: Upper bound on any one rate.
            method: ``"exact"`` or ``"greedy"``.

        Returns:
            The new per-branch rates.

        Raises:
            ValueError: If no sensitivity is given or measured, FLOPs are unknown, or the
                allocation problem is invalid.
        """
        if self.mask_mode == "structured":
            raise ValueError(
                "structured masks drop the branches below a random cut, so per-branch rates do not apply; set the "
                "rate with handle.set_drop_rates(rate), or apply DropBP with mask='random'"
            )
        if sensitivity is None:
            if self.sensitivities is None:
                raise ValueError("no sensitivity given or measured; call handle.sensitivity(closure) first")
            sensitivity = self.sensitivities
        sensitivity = check_nonnegative(sensitivity, "sensitivity")
        if len(sensitivity) != len(self.branches):
            raise ValueError(f"expected {len(self.branches)} sensitivities (one per branch), got {len(sensitivity)}")
        rates = allocate_drop_rates(sensitivity, self._known_flops(), target, max_rate=max_rate, method=method)
        self.sensitivities = list(sensitivity)
        self.set_drop_rates(rates, target=target)
        return rates

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the exact mask sequence (JSON-serialisable)."""
        return {
            "version": STATE_VERSION,
            "branches": [b.name for b in self.branches],
            "seed": self.seed,
            "step": self.stream.step,
            "drop_rates": self.drop_rates,
            "mask": list(self.stream.mask),
            "sensitivities": self.sensitivities,
            "target": self.stream.target,
            "schedule": self.stream.schedule_spec,
            "mask_mode": self.mask_mode,
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore rates, sensitivities, seed, mask and the step counter, all or nothing.

        Raises:
            ValueError: If the state is not a dict from :meth:`state_dict` of this library
                version, misses a key, was saved for a different set of branches, or holds
                a bad value. Nothing is changed then.
        """
        if not isinstance(state, dict):
            raise ValueError(f"DropBP state must be a dict from handle.state_dict(), got {type(state).__name__}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"DropBP state lacks {', '.join(missing)}; pass a dict saved by handle.state_dict()")
        if state["version"] != STATE_VERSION:
            raise ValueError(
                f"DropBP state has version {state['version']!r}, this dropbp reads version {STATE_VERSION}; "
                "save it again with this dropbp"
            )
        names = [b.name for b in self.branches]
        if list(state["branches"]) != names:
            raise ValueError(
                f"DropBP state is for {len(state['branches'])} branches that differ from this model's "
                f"{len(names)}; load it into the same architecture and branch patterns"
            )
        rates = check_rates(state["drop_rates"], len(names))
        mask = check_mask(state.get("mask", [False] * len(names)), len(names))
        step = check_int(state["step"], "DropBP state's step", minimum=0)
        seed = check_int(state["seed"], "DropBP state's seed")
        sens = state.get("sensitivities")
        if sens is not None:
            sens = check_nonnegative(sens, "sensitivities")
            if len(sens) != len(names):
                raise ValueError(f"DropBP state has {len(sens)} sensitivities for {len(names)} branches")
        saved_schedule = (state.get("schedule"), state.get("total_steps"))
        if "schedule" in state and saved_schedule != (self.stream.schedule_spec, self.total_steps):
            raise ValueError(
                f"DropBP state was saved with drop schedule {saved_schedule[0]!r} over {saved_schedule[1]} steps, "
                f"this handle follows {self.stream.schedule_spec!r} over {self.total_steps}; resume with the same "
                "schedule and run length, or the masks would differ"
            )
        saved_mode = state.get("mask_mode", "random")
        if saved_mode != self.mask_mode:
            raise ValueError(
                f"DropBP state was saved with mask={saved_mode!r}, this handle draws mask={self.mask_mode!r}; resume "
                "with the same mask mode, or the masks would differ"
            )
        target = state.get("target")
        target = None if target is None else check_rate(target, "DropBP state's target")
        # Everything is checked: now change the handle.
        self.sensitivities = sens
        self.stream.seed = seed
        self.stream.step = step
        self.stream.set_mask(mask)
        self.set_drop_rates(rates, target=target)

    def remove(self) -> None:
        """Remove every hook; the model is exactly as it was before :func:`apply`."""
        for hook in self._hook_handles:
            hook.remove()
        self._hook_handles = []
        self.routing.replays.remove()
        release_guards(self.model)

    def __repr__(self) -> str:
        return (
            f"DropBPHandle({len(self.branches)} branches, mean drop rate "
            f"{sum(self.drop_rates) / max(1, len(self.branches)):.3f}, step {self.stream.step})"
        )


def _handles_on(module: nn.Module) -> Iterator[DropBPHandle]:
    for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
        dropbp_hook = getattr(hook, "__self__", hook)
        if isinstance(dropbp_hook, (hooks.EntryHook, hooks.BranchHook, hooks.KeyHook)):
            yield dropbp_hook.owner


def find_handle(model: nn.Module) -> DropBPHandle | None:
    """Return the handle attached to ``model``, to a module inside it, or to a module around it.

    The handle is found through its hooks (the model holds them, so no registry keeps a
    model alive). The Trainer callback uses this to skip applying twice when the user
    already called :func:`apply` on, say, the base model inside a ``PeftModel``.
    """
    for module in model.modules():
        for handle in _handles_on(module):
            return handle
    return None


def attach_handle(model: nn.Module, branches: Sequence[str] | None, **settings: Any) -> DropBPHandle:
    """Resolve the branches and attach the hooks: :func:`dropbp.apply` without its checks and verification.

    Args:
        model: The model.
        branches: fnmatch patterns, or None to find them (see :func:`dropbp.architectures.resolve_branches`).
        **settings: :class:`DropBPHandle` settings (``seed``, ``auto_step``, ``drop_rate``, ...).

    Returns:
        The handle, with :attr:`DropBPHandle.branch_source` set.
    """
    specs = resolve_branches(model, branches)
    handle = DropBPHandle(model, specs, **{"seed": 0, "auto_step": True, "drop_rate": 0.5, **settings})
    handle.branch_source = branch_source(model, branches)
    return handle
