"""``dropbp.apply`` and the handle it returns: the thin stateful shell over the pure core."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dropbp import hooks
from dropbp.allocation import allocate_drop_rates, flops_weighted_rate
from dropbp.architectures import BranchSpec, branch_source, resolve_branches
from dropbp.config import DropBPConfig
from dropbp.distributed import assert_same_on_all_ranks, require_find_unused
from dropbp.errors import COMPILE_REFUSED, DropBPError
from dropbp.flops import FlopMeter
from dropbp.forwards import Forwards
from dropbp.hooks import Branch
from dropbp.masks import sample_mask, sample_structured_mask
from dropbp.schedules import DropSchedule, parse_schedule, scheduled_rates
from dropbp.sensitivity import Metric, measure_sensitivity
from dropbp.validation import check_int, check_mask, check_nonnegative, check_rate, check_rates
from dropbp.zero import release_guards

__all__ = ["DropBPHandle", "apply", "find_handle"]

STATE_VERSION = 1
_STATE_KEYS = ("version", "branches", "seed", "step", "drop_rates")


def _checkpointing_owner(model: nn.Module, name: str) -> nn.Module | None:
    """The innermost module around a branch with a Hugging Face ``gradient_checkpointing`` switch.

    transformers 5 sets it on each decoder layer (``every_n_layers`` leaves some off) and on
    the model body; older versions on the body only. When it is on, the branch is
    recomputed in backward.
    """
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:i]))
        if hasattr(module, "gradient_checkpointing"):
            return module
    return None


def _entry_modules(model: nn.Module, specs: list[BranchSpec]) -> list[nn.Module]:
    """``model`` and each module inside it that holds every branch, outermost first.

    A training forward may start at any of them: ``model.model(...)`` runs the decoder
    body of a causal LM, and PEFT's ``merge_and_unload()`` hands back the model inside a
    ``PeftModel``.
    """
    paths = [spec.start.split(".")[:-1] for spec in specs]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return [model] + [model.get_submodule(".".join(common[:k])) for k in range(1, len(common) + 1)]


def _make_branch(model: nn.Module, spec: BranchSpec, index: int) -> Branch:
    start, end = model.get_submodule(spec.start), model.get_submodule(spec.end)
    if start is end:
        return Branch(name=spec.name, module=start, index=index)
    parent = model.get_submodule(spec.start.rpartition(".")[0]) if "." in spec.start else model
    children = list(parent.children())
    first, last = children.index(start), children.index(end)
    return Branch(name=spec.name, module=start, index=index, end_module=end, modules=tuple(children[first : last + 1]))


class DropBPHandle:
    """DropBP attached to one model. Created by :func:`apply`; not constructed directly.

    The handle owns the mask stream (``seed``, step counter, rates), the per-branch hooks
    and the per-run bookkeeping. Each training forward of ``model`` takes its mask from
    the stream when it starts (see :mod:`dropbp.hooks`); everything that forward's
    recompute needs stays with that forward, so several forwards may wait for their
    backward at once, in any order.

    Attributes:
        branches: The residual branches in execution order.
        model: The module DropBP was applied to.
        seed: Seed of the mask stream.
        auto_step: Whether each training forward of ``model`` samples the next mask.
        replay: Under gradient checkpointing, return a dropped branch's first-pass output in
            the recompute instead of running the branch again (exact; saves its FLOPs).
        sensitivities: The last sensitivities measured or loaded, else ``None``.
        branch_source: Where the branches came from: ``"table"`` (the architecture table),
            ``"fallback"`` (the generic rule) or ``"patterns"`` (``branches=``).
        entry_modules: ``model`` and the modules inside it that hold every branch, outermost
            first: a training forward of any of them draws its own mask.
    """

    def __init__(
        self, model: nn.Module, specs: list[BranchSpec], seed: int, auto_step: bool, drop_rate: float,
        check_ranks: bool = False, replay: bool = True, mask_mode: str = "random",
    ):
        self.model = model
        #: ``"random"`` or ``"structured"`` (see :mod:`dropbp.masks`).
        self.mask_mode = mask_mode
        self.seed = check_int(seed, "seed")
        self.auto_step = bool(auto_step)
        self.check_ranks = bool(check_ranks)
        self.replay = bool(replay)
        self.branches: list[Branch] = [_make_branch(model, spec, i) for i, spec in enumerate(specs)]
        for branch in self.branches:
            branch.drop_rate = drop_rate
        self.sensitivities: list[float] | None = None
        #: The settings :func:`apply` was given (None for a handle built otherwise); calibrate() reads them.
        self.config: DropBPConfig | None = None
        # "table", "fallback" or "patterns": fallback branches are verified on the first batch by the
        # callback and dropbp finetune (dropbp.verify.require_sound_branches).
        self.branch_source = "patterns"
        self._step = 0
        self.schedule: DropSchedule | Callable[[int], float] | None = None
        self.total_steps: int | None = None
        self._base_rate = float(drop_rate)  # the rate the per-branch rates realise, which a schedule scales
        self._mask = [False] * len(self.branches)
        self._drop_counts = [0] * len(self.branches)
        self._counted_steps = 0
        self._all_indices = tuple(range(len(self.branches)))
        # Spans (OPT's fc1..fc2) start and end in different modules: one forward cannot be shadowed.
        self._owners = [_checkpointing_owner(model, spec.start) if spec.start == spec.end else None for spec in specs]
        parents = [spec.start.rpartition(".")[0] for spec in specs]
        self._later_in_layer = [
            tuple(j for j in range(i + 1, len(specs)) if parents[j] == parents[i]) for i in range(len(specs))
        ]
        self._meter = FlopMeter(len(self.branches), param_counts=[sum(p.numel() for p in b.parameters())
                                                                  for b in self.branches],
                                names=[b.name for b in self.branches])
        self._hook_handles = self._register_hooks(specs)
        self._init_runtime()

    def _init_runtime(self) -> None:
        """The per-process state a copy of the handle must not share."""
        self._lock = threading.Lock()
        self._overrides: list[tuple[bool, ...]] = []
        self._forwards = Forwards(self)

    def _register_hooks(self, specs: list[BranchSpec]) -> list:
        model = self.model
        handles = []
        # Entry modules first, so their pre-hooks open the forward before anything inside it records.
        self.entry_modules = _entry_modules(model, specs)
        for depth, module in enumerate(self.entry_modules):
            entry = hooks.EntryHook(self, module, depth)
            handles += hooks.register(module, pre=entry.pre, post=entry.post)
        covers: dict[int, tuple[nn.Module, set[int]]] = {}
        for i, spec in enumerate(specs):
            parts = spec.start.split(".")
            around = [model.get_submodule(".".join(parts[:k])) for k in range(1, len(parts))]
            beside = list((around[-1] if around else model).children())
            for module in (*around, *beside):
                covers.setdefault(id(module), (module, set()))[1].add(i)
        for module, indices in covers.values():  # before the branch hooks: a recompute is matched first
            handles += hooks.register(module, pre=hooks.KeyHook(self, tuple(sorted(indices))))
        for branch in self.branches:
            hook = hooks.BranchHook(self, branch.index)
            handles += hooks.register(branch.module, pre=hook.pre)
            handles += hooks.register(branch.end_module, post=hook.post)
        return handles

    _RUNTIME = frozenset({"_lock", "_overrides", "_forwards"})

    def _refuse_copy_while_kept(self, action: str) -> None:
        if any(self._forwards.replays.shadowed()):
            raise DropBPError(
                f"cannot {action} the model while outputs are kept for a gradient-checkpointing recompute; "
                f"{action} it before the training forward or after its backward"
            )

    def __deepcopy__(self, memo: dict) -> DropBPHandle:
        # Reached through the hooks when the model is deep-copied: the copy gets its own
        # handle (same rates, seed and step) on the copied modules.
        self._refuse_copy_while_kept("copy")
        clone = object.__new__(DropBPHandle)
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            if name not in self._RUNTIME:
                setattr(clone, name, copy.deepcopy(value, memo))
        clone._init_runtime()
        return clone

    def __getstate__(self) -> dict[str, Any]:
        # Reached through the hooks when the model is pickled (torch.save(model)): the hooks travel
        # with the model, and the unpickled model has DropBP with the same rates, seed and step.
        # The per-process state (locks, forwards in flight, DeepSpeed guards) starts afresh.
        self._refuse_copy_while_kept("pickle")
        return {name: value for name, value in self.__dict__.items() if name not in self._RUNTIME}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # ------------------------------------------------------------------ masks
    @property
    def step_count(self) -> int:
        """Number of masks sampled so far; the next :meth:`step` samples mask ``step_count``."""
        return self._step

    @property
    def mask(self) -> list[bool]:
        """The mask in force (True = that branch's backward is dropped)."""
        return list(self._mask)

    def step(self) -> list[bool]:
        """Sample the mask for the next forward/backward and advance the step counter.

        Returns:
            The new mask, one bool per branch.
        """
        with self._lock:  # forwards in several threads each take their own step
            step = self._step
            sampler = sample_structured_mask if self.mask_mode == "structured" else sample_mask
            mask = sampler(self.seed, step, self.rates_at(step))
            self._step += 1
            self._mask = mask
            self._counted_steps += 1
            for i, dropped in enumerate(mask):
                self._drop_counts[i] += dropped
        if self.check_ranks:
            assert_same_on_all_ranks(step, mask)
        return list(mask)

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
        steps, counts = self._counted_steps, self._drop_counts
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
        if reset:
            self._drop_counts = [0] * len(self.branches)
            self._counted_steps = 0
        return stats

    def set_mask(self, mask: Sequence[bool]) -> None:
        """Force a mask for the next forward without advancing the step counter.

        With ``auto_step=True`` the next training forward replaces it; use
        ``auto_step=False`` (or :meth:`paused`) to keep a forced mask.

        Raises:
            ValueError: If the mask length differs from the number of branches.
        """
        self._mask = check_mask(mask, len(self.branches))

    @property
    def drop_rates(self) -> list[float]:
        """Per-branch drop rates, in execution order."""
        return [b.drop_rate for b in self.branches]

    def set_drop_rates(self, rates: Sequence[float] | float, target: float | None = None) -> None:
        """Set the per-branch drop rates (a single number sets them all).

        Args:
            rates: One rate per branch, or one rate for all.
            target: The rate these rates realise, which a drop schedule scales (see
                :meth:`set_schedule`); default: the single rate, or the rates' mean.

        Raises:
            ValueError: On a wrong length or a rate that is NaN or outside ``[0, 1)``.
        """
        if isinstance(rates, (int, float)):
            rates = [rates] * len(self.branches)
        rates = check_rates(rates, len(self.branches))
        for branch, rate in zip(self.branches, rates):
            branch.drop_rate = rate
        base = sum(rates) / max(1, len(rates)) if target is None else check_rate(target, "target")
        self._base_rate = base

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
        if isinstance(schedule, str):
            schedule = parse_schedule(schedule)
            if schedule.kind == "constant":
                schedule = None
        if schedule is not None and not isinstance(schedule, DropSchedule) and not callable(schedule):
            raise ValueError(f"schedule must be a spec string or a callable step -> rate, got {schedule!r}")
        total = None if total_steps is None else check_int(total_steps, "total_steps", minimum=1)
        if isinstance(schedule, DropSchedule) and total is None:
            raise ValueError(f"the drop schedule {schedule.spec!r} needs total_steps, the mask steps of the run")
        self.schedule, self.total_steps = schedule, total

    def rates_at(self, step: int) -> list[float]:
        """The per-branch rates in force at mask step ``step`` (the schedule applied)."""
        if self.schedule is None:
            return self.drop_rates
        return scheduled_rates(self.drop_rates, self.schedule, step, self.total_steps or 0, self._base_rate)

    @property
    def kept_for_replay(self) -> list[int]:
        """Per branch, how many first-pass outputs wait for a checkpoint recompute to replay them."""
        return self._forwards.replays.pending()

    def kept_for_replay_bytes(self) -> int:
        """Bytes held by the outputs kept for checkpoint replays (each storage counted once)."""
        return self._forwards.replays.kept_bytes(self._forwards.keys.live_contexts())

    def implausible_flops(self) -> list[str]:
        """Names of the branches whose counted FLOPs are far below ``2 x parameters x tokens``.

        Such a count (see :func:`dropbp.flops.implausible_flops`) means torch's FLOP counter
        missed the branch's main kernel; it was also reported with a ``DropBPFlopWarning``.
        """
        return [self.branches[i].name for i in sorted(self._meter.implausible)]

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
        with self._forced([False] * len(self.branches)):
            yield

    @contextlib.contextmanager
    def _forced(self, mask: Sequence[bool]) -> Iterator[None]:
        """Within this block, every training forward uses ``mask`` and the stream stays put."""
        self._overrides.append(tuple(check_mask(mask, len(self.branches))))
        try:
            yield
        finally:
            self._overrides.pop()

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
        result = measure_sensitivity(self, closure, metric, method)
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
            "step": self._step,
            "drop_rates": self.drop_rates,
            "mask": list(self._mask),
            "sensitivities": self.sensitivities,
            "target": self._base_rate,
            "schedule": self._schedule_spec(),
            "mask_mode": self.mask_mode,
            "total_steps": self.total_steps,
        }

    def _schedule_spec(self) -> str | None:
        if self.schedule is None:
            return None
        return self.schedule.spec if isinstance(self.schedule, DropSchedule) else "callable"

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
        if "schedule" in state and saved_schedule != (self._schedule_spec(), self.total_steps):
            raise ValueError(
                f"DropBP state was saved with drop schedule {saved_schedule[0]!r} over {saved_schedule[1]} steps, "
                f"this handle follows {self._schedule_spec()!r} over {self.total_steps}; resume with the same "
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
        self.seed = seed
        self._step = step
        self._mask = mask
        self.set_drop_rates(rates, target=target)

    def remove(self) -> None:
        """Remove every hook; the model is exactly as it was before :func:`apply`."""
        for hook in self._hook_handles:
            hook.remove()
        self._hook_handles = []
        self._forwards.replays.remove()
        release_guards(self.model)

    def __repr__(self) -> str:
        return (
            f"DropBPHandle({len(self.branches)} branches, mean drop rate "
            f"{sum(self.drop_rates) / max(1, len(self.branches)):.3f}, step {self._step})"
        )


def _handles_on(module: nn.Module) -> Iterator[DropBPHandle]:
    for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
        owner = getattr(hook, "__self__", hook)
        if isinstance(owner, (hooks.EntryHook, hooks.BranchHook, hooks.KeyHook)):
            yield owner.handle


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
    handle = _attach(model, config.branches, seed=config.seed, auto_step=config.auto_step,
                     drop_rate=config.drop_rate, check_ranks=check_ranks, replay=config.replay,
                     mask_mode=config.mask)
    handle.config = config
    try:
        handle.set_schedule(schedule if callable(schedule) else config.drop_schedule, total_steps)
    except ValueError:
        handle.remove()
        raise
    if handle.branch_source == "fallback":
        from dropbp.verify import verify_fallback_on_a_tiny_copy

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


def _attach(model: nn.Module, branches: Sequence[str] | None, **settings: Any) -> DropBPHandle:
    """Resolve the branches and attach the hooks, without the fallback's verification."""
    specs = resolve_branches(model, branches)
    handle = DropBPHandle(model, specs, **{"seed": 0, "auto_step": True, "drop_rate": 0.5, **settings})
    handle.branch_source = branch_source(model, branches)
    return handle
