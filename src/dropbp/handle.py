"""``dropbp.apply`` and the handle it returns: the thin stateful shell over the pure core."""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dropbp import hooks
from dropbp.allocation import allocate_drop_rates, flops_weighted_rate
from dropbp.architectures import BranchSpec, resolve_branches
from dropbp.distributed import (
    FSDP1_SENSITIVITY_REFUSED,
    assert_same_on_all_ranks,
    average_over_ranks,
    fsdp_modules,
    gathered,
    require_find_unused,
)
from dropbp.flops import flop_counter
from dropbp.hooks import Branch
from dropbp.masks import sample_mask
from dropbp.sensitivity import Metric, exact_sensitivity, naive_sensitivity
from dropbp.validation import check_mask, check_nonnegative, check_rate, check_rates

__all__ = ["DropBPHandle", "apply", "find_handle"]

_STATE_VERSION = 1
# Padded lengths vary per batch; a few hundred shapes cover any realistic run.
_MAX_CACHED_SHAPES = 512

# Root module -> its handle; weak so a deleted model does not stay alive through us.
_HANDLES: "weakref.WeakKeyDictionary[nn.Module, DropBPHandle]" = weakref.WeakKeyDictionary()


@dataclass
class _Frame:
    """What a branch's pre-hook hands to its post-hook for one call."""

    grad_was_enabled: bool
    dropped: bool
    counter: Any
    key: tuple | None
    input_requires_grad: bool
    rng_before: tuple | None = None  # set when the output is kept for a checkpoint replay


COMPILE_REFUSED = (
    "DropBP does not support torch.compile for training: a compiled graph fixes which branches build a "
    "backward, so it would either recompile for every new mask or compute wrong gradients; train the model "
    "uncompiled (HF Trainer: torch_compile=False), or call handle.remove() before compiling"
)


def _refuse_compile() -> None:
    """Fail the compilation itself; an exception raised in traced code would only break the graph."""
    from torch._dynamo.comptime import comptime

    def fail(ctx: Any) -> None:
        raise RuntimeError(COMPILE_REFUSED)

    comptime(fail)


def _checkpointing_owners(model: nn.Module, name: str) -> tuple[nn.Module, ...]:
    """Modules around a branch with a Hugging Face ``gradient_checkpointing`` switch.

    transformers 5 sets it on each decoder layer, older versions on the model body; when
    one is on, the branch is recomputed in backward.
    """
    parts = name.split(".")
    around = (model.get_submodule(".".join(parts[:i])) for i in range(len(parts)))
    return tuple(m for m in around if hasattr(m, "gradient_checkpointing"))


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

    Attributes:
        branches: The residual branches in execution order.
        model: The module DropBP was applied to.
        seed: Seed of the mask stream.
        auto_step: Whether each training forward of ``model`` samples the next mask.
        sensitivities: The last sensitivities measured or loaded, else ``None``.
    """

    def __init__(
        self, model: nn.Module, specs: list[BranchSpec], seed: int, auto_step: bool, drop_rate: float,
        check_ranks: bool = False,
    ):
        self.model = model
        self.seed = int(seed)
        self.auto_step = bool(auto_step)
        self.check_ranks = bool(check_ranks)
        self._checked_ddp: set[int] = set()
        self.branches: list[Branch] = [_make_branch(model, spec, i) for i, spec in enumerate(specs)]
        # Spans (OPT's fc1..fc2) start and end in different modules: one forward cannot be shadowed.
        self._owners = [
            _checkpointing_owners(model, spec.start) if spec.start == spec.end else () for spec in specs
        ]
        parents = [spec.start.rpartition(".")[0] for spec in specs]
        self._later_in_layer = [
            [j for j in range(i + 1, len(specs)) if parents[j] == parents[i]] for i in range(len(specs))
        ]
        self._replay_dropped = True  # benchmarks switch it off to measure what the replay saves
        self._training_forward = False
        for branch in self.branches:
            branch.drop_rate = drop_rate
        self.sensitivities: list[float] | None = None
        self._step = 0
        self._mask = [False] * len(self.branches)
        self._drop_counts = [0] * len(self.branches)
        self._counted_steps = 0
        self._paused = 0
        self._capture: list[torch.Tensor | None] | None = None
        self._anchor: torch.Tensor | None = None
        for branch in self.branches:
            hooks.register(branch, self._pre_hook, self._post_hook)
        self._root_hooks = [
            model.register_forward_pre_hook(self._root_pre_hook),
            model.register_forward_hook(self._root_post_hook, always_call=True),
        ]

    # ------------------------------------------------------------------ hooks
    def _root_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if module.training and torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                _refuse_compile()
            self._check_ddp_wrapper()
            self._training_forward = True
            for branch in self.branches:  # outputs kept for a backward that never came
                hooks.clear_replay(branch, unblock=True)
            if self.auto_step and not self._paused:
                self.step()

    def _check_ddp_wrapper(self) -> None:
        """Refuse a DDP wrapper that would hang or fail on parameters without gradients."""
        active = getattr(DistributedDataParallel, "_get_active_ddp_module", lambda: None)()
        if active is None or id(active) in self._checked_ddp:
            return
        self._checked_ddp.add(id(active))
        require_find_unused(active)

    def _root_post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._training_forward = False
        # A forward that raised between a span's first and last module leaves frames
        # behind: close their FLOP counters and restore the grad mode they saved, so the
        # error leaks neither a dispatch mode nor no-grad.
        for branch in self.branches:
            while branch._frames:
                frame = branch._frames.pop()
                if frame.counter is not None:
                    frame.counter.__exit__(None, None, None)
                torch.set_grad_enabled(frame.grad_was_enabled)

    def _pre_hook(self, branch: Branch, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled() and torch.compiler.is_compiling():
            _refuse_compile()  # a compiled layer inside an eager model
        key = hooks.shape_key(args, kwargs)
        counter = None
        if key in branch._flops_by_shape:
            branch.flops = branch._flops_by_shape[key]
        else:  # counting runs the forward under a Python dispatch mode: do it once per shape
            counter = flop_counter()
            counter.__enter__()
        grad = torch.is_grad_enabled()
        masked = module.training and self._mask[branch.index]
        dropped = grad and masked
        x = hooks.first_input(args, kwargs)
        frame = _Frame(grad, dropped, counter, key, bool(x is not None and x.requires_grad))
        # Under reentrant checkpointing the first pass runs without grad, so keep on `masked`.
        if masked and x is not None and self._will_recompute(branch):
            frame.rng_before = hooks.rng_state(x.device)
        branch._frames.append(frame)
        if dropped:
            torch.set_grad_enabled(False)

    def _post_hook(self, branch: Branch, module: nn.Module, args: tuple, output: Any) -> Any:
        frame: _Frame = branch._frames.pop()
        if frame.dropped:
            torch.set_grad_enabled(frame.grad_was_enabled)
        if frame.counter is not None:
            frame.counter.__exit__(None, None, None)
            if output is not None:
                branch.flops = int(frame.counter.get_total_flops())
                if len(branch._flops_by_shape) >= _MAX_CACHED_SHAPES:
                    branch._flops_by_shape.pop(next(iter(branch._flops_by_shape)))
                branch._flops_by_shape[frame.key] = branch.flops
        if output is None:  # the forward raised; always_call only restores state
            return None
        if frame.rng_before is not None and (out := hooks.first_tensor(output)) is not None:
            device = out.device
            hooks.install_replay(branch, output, frame.rng_before, hooks.rng_state(device), device)
        if self._capture is not None and not frame.dropped:
            self._capture[branch.index] = hooks.first_tensor(output)
        if frame.dropped and branch.index == len(self.branches) - 1 and not frame.input_requires_grad:
            return self._anchored(output)
        return None

    def _will_recompute(self, branch: Branch) -> bool:
        """Whether gradient checkpointing will run this call again in backward.

        Reentrant checkpointing (its first pass runs without grad) recomputes the whole
        layer. Non-reentrant checkpointing stops once the tensors the backward needs are
        rebuilt, so it reaches a dropped branch only if a later branch of the same layer
        builds a graph; keeping an output nobody replays would only cost memory.
        """
        if not (
            self._replay_dropped
            and self._training_forward
            and any(owner.gradient_checkpointing is True and owner.training for owner in self._owners[branch.index])
            and not hooks.in_backward()
        ):
            return False
        return not torch.is_grad_enabled() or any(not self._mask[j] for j in self._later_in_layer[branch.index])

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
        self._mask = sample_mask(self.seed, self._step, self.drop_rates)
        if self.check_ranks:
            assert_same_on_all_ranks(self._step, self._mask)
        self._step += 1
        self._counted_steps += 1
        for i, dropped in enumerate(self._mask):
            self._drop_counts[i] += dropped
        return list(self._mask)

    def drop_statistics(self, reset: bool = True) -> dict[str, float]:
        """What the masks sampled since the last reset actually dropped.

        Args:
            reset: Start a new tally after reading.

        Returns:
            ``steps`` (masks sampled), ``drop_rate`` (mean fraction of branches dropped)
            and ``backward_flops_skipped`` (mean fraction of branch backward FLOPs skipped;
            NaN while FLOPs are unknown). Empty values are 0.
        """
        steps, counts = self._counted_steps, self._drop_counts
        stats = {"steps": float(steps), "drop_rate": 0.0, "backward_flops_skipped": 0.0}
        if steps and self.branches:
            stats["drop_rate"] = sum(counts) / (steps * len(self.branches))
            flops = self.flops
            if any(f is None for f in flops):
                stats["backward_flops_skipped"] = float("nan")
            else:
                stats["backward_flops_skipped"] = flops_weighted_rate([c / steps for c in counts], flops)
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

    def set_drop_rates(self, rates: Sequence[float] | float) -> None:
        """Set the per-branch drop rates (a single number sets them all).

        Raises:
            ValueError: On a wrong length or a rate that is NaN or outside ``[0, 1)``.
        """
        if isinstance(rates, (int, float)):
            rates = [rates] * len(self.branches)
        for branch, rate in zip(self.branches, check_rates(rates, len(self.branches))):
            branch.drop_rate = rate

    @property
    def flops(self) -> list[int | None]:
        """Per-branch forward FLOPs at the last input shape (``None`` before a forward)."""
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
        saved = self._mask
        self._paused += 1
        self._mask = [False] * len(self.branches)
        try:
            yield
        finally:
            self._paused -= 1
            self._mask = saved

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
        """
        fsdp1, fsdp2 = fsdp_modules(self.model)
        if fsdp1:
            raise ValueError(FSDP1_SENSITIVITY_REFUSED)
        if fsdp2 and method != "fast":
            raise ValueError("under FSDP2 only method='fast' measures sensitivity; the naive check needs whole parameters")
        params = self.trainable_parameters()
        if not params:
            raise ValueError("the model has no parameters that require grad; nothing to measure")
        if method == "fast":
            with self.paused():
                self._capture = [None] * len(self.branches)
                try:
                    loss = closure()
                    outputs = self._capture
                finally:
                    self._capture = None
                with gathered(fsdp2) as gather:
                    if fsdp2:  # the graph's leaves are the unsharded parameters, held only while gathered
                        params = self.trainable_parameters()
                    result = exact_sensitivity(loss, outputs, params, metric, before_backward=gather)
                del loss, outputs
        elif method == "naive":
            # Each pass must see the same dropout draws as the first.
            devices = sorted({p.device.index for p in params if p.device.type == "cuda"})
            with torch.random.fork_rng(devices=devices):
                rng_state = torch.get_rng_state()
                cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

                def loss_with_mask(mask: list[bool]) -> torch.Tensor:
                    torch.set_rng_state(rng_state)
                    for d, s in zip(devices, cuda_states):
                        torch.cuda.set_rng_state(s, d)
                    self._mask = mask
                    return closure()

                with self.paused():
                    result = naive_sensitivity(loss_with_mask, len(self.branches), params, metric)
        else:
            raise ValueError(f"method must be 'fast' or 'naive', got {method!r}")
        result = average_over_ranks(result, params[0].device)
        self.sensitivities = result
        return list(result)

    def calibrate(
        self,
        closures: Sequence[Callable[[], torch.Tensor]],
        target: float,
        max_rate: float = 0.9,
        allocation: Literal["exact", "greedy"] = "exact",
        metric: Metric = "grad_diff",
    ) -> list[float]:
        """Measure sensitivity averaged over several batches, then allocate rates for ``target``.

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
        if missing:
            raise ValueError(
                f"FLOPs of {len(missing)} branches are unknown (e.g. {missing[0]}); "
                "run one forward of the model (or handle.sensitivity) first"
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
        if sensitivity is None:
            if self.sensitivities is None:
                raise ValueError("no sensitivity given or measured; call handle.sensitivity(closure) first")
            sensitivity = self.sensitivities
        sensitivity = check_nonnegative(sensitivity, "sensitivity")
        if len(sensitivity) != len(self.branches):
            raise ValueError(f"expected {len(self.branches)} sensitivities (one per branch), got {len(sensitivity)}")
        rates = allocate_drop_rates(sensitivity, self._known_flops(), target, max_rate=max_rate, method=method)
        self.sensitivities = list(sensitivity)
        self.set_drop_rates(rates)
        return rates

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the exact mask sequence (JSON-serialisable)."""
        return {
            "version": _STATE_VERSION,
            "branches": [b.name for b in self.branches],
            "seed": self.seed,
            "step": self._step,
            "drop_rates": self.drop_rates,
            "mask": list(self._mask),
            "sensitivities": self.sensitivities,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore rates, sensitivities, seed and the step counter.

        Raises:
            ValueError: If the state was saved for a different set of branches.
        """
        names = [b.name for b in self.branches]
        if list(state.get("branches", [])) != names:
            raise ValueError(
                f"DropBP state is for {len(state.get('branches', []))} branches that differ from this model's "
                f"{len(names)}; load it into the same architecture and branch patterns"
            )
        rates = check_rates(state["drop_rates"], len(names))
        mask = check_mask(state.get("mask", [False] * len(names)), len(names))
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"DropBP state has a negative step {step}")
        sens = state.get("sensitivities")
        self.sensitivities = None if sens is None else check_nonnegative(sens, "sensitivities")
        self.seed = int(state["seed"])
        self._step = step
        self._mask = mask
        self.set_drop_rates(rates)

    def remove(self) -> None:
        """Remove every hook; the model is exactly as it was before :func:`apply`."""
        for branch in self.branches:
            hooks.unregister(branch)
        for hook in self._root_hooks:
            hook.remove()
        if _HANDLES.get(self.model) is self:
            del _HANDLES[self.model]

    def __repr__(self) -> str:
        return (
            f"DropBPHandle({len(self.branches)} branches, mean drop rate "
            f"{sum(self.drop_rates) / max(1, len(self.branches)):.3f}, step {self._step})"
        )


def find_handle(model: nn.Module) -> DropBPHandle | None:
    """Return the handle attached to ``model``, to a module inside it, or to a module around it.

    The Trainer callback uses this to skip applying twice when the user already called
    :func:`apply` on, say, the base model inside a ``PeftModel``.
    """
    if model in _HANDLES:
        return _HANDLES[model]
    for root, handle in list(_HANDLES.items()):
        if any(m is root for m in model.modules()) or any(m is model for m in root.modules()):
            return handle
    return None


def apply(
    model: nn.Module,
    drop_rate: float = 0.5,
    seed: int = 0,
    branches: Sequence[str] | None = None,
    auto_step: bool = True,
    *,
    check_ranks: bool = False,
) -> DropBPHandle:
    """Attach DropBP to a model.

    Args:
        model: The model to train (a transformers model, a ``PeftModel`` or any module).
        drop_rate: Initial drop rate of every branch, in ``[0, 1)``.
        seed: Mask seed; use the same on every data-parallel rank.
        branches: fnmatch patterns over ``model.named_modules()`` names selecting the
            residual branch modules. ``None`` auto-detects known architectures.
        auto_step: If True, every forward of ``model`` in training mode with grad enabled
            samples the next mask, so a manual loop needs nothing else.
        check_ranks: Debug option for data-parallel runs: at every step, one all_gather
            checks that all ranks drew the same mask (they do by construction when seeds,
            rates and step counters agree).

    Returns:
        The :class:`DropBPHandle`; ``handle.remove()`` undoes everything.

    Raises:
        ValueError: On a bad rate, patterns that match nothing or nested branches, an
            unknown architecture without ``branches=``, a model that already has DropBP, a
            ``DistributedDataParallel`` wrapper without ``find_unused_parameters=True`` (also
            detected at the first training forward when DropBP is applied to the inner model),
            or a ``torch.compile``-d model.
        RuntimeError: At the first training forward compiled by ``torch.compile`` (the whole
            model or any layer holding a branch): DropBP's per-step masks cannot live in a
            compiled graph. Compiled forwards in eval mode or under ``no_grad`` are fine.
    """
    drop_rate = check_rate(drop_rate, "drop_rate")
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not loaded: nothing can be compiled yet
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        raise ValueError(COMPILE_REFUSED)
    if isinstance(model, DistributedDataParallel):
        require_find_unused(model)
    if find_handle(model) is not None:
        raise ValueError("DropBP is already applied to this model; call handle.remove() before applying again")
    specs = resolve_branches(model, branches)
    handle = DropBPHandle(model, specs, seed=seed, auto_step=auto_step, drop_rate=drop_rate, check_ranks=check_ranks)
    _HANDLES[model] = handle
    return handle
