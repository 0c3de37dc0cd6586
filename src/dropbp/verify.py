"""``dropbp.check`` (this module is ``dropbp.verify``): verify on small random inputs that DropBP trains a model exactly.

DropBP is exact only if every branch it drops is a residual branch: a module whose output
is *added* to a residual stream that bypasses it. A module that adds the residual inside
its own ``forward`` (Bloom's attention, MPT's MLP, a whole decoder layer) cuts the stream
when it runs without grad, and every layer below it then trains on a wrong gradient with
no error. These checks find that, and the other ways the mechanism could go wrong, by
comparing against references on the model itself:

- ``forward unchanged``: outputs are bitwise equal under random masks;
- ``drop rate 0``: gradients bitwise equal to the model without DropBP;
- ``dropped branches``: a dropped branch's own parameters get no gradient, and every other
  gradient equals the paper code's detach reference at the same mask;
- ``residual stream``: with every branch dropped, the gradient still reaches the start of
  the layer stack, and where the stack is the identity once the branches' outputs are
  zero (pre-norm and parallel-residual blocks), that gradient equals the one at its end;
- ``no residual inside``: with its own parameters zeroed, no branch returns one of its
  inputs (which would mean it adds the residual itself);
- ``branch FLOPs``: every branch's counted forward FLOPs are plausible for its parameters
  (an uncounted kernel, such as a Mixture-of-Experts grouped GEMM torch's counter missed,
  counts far less), so rates are allocated and savings reported by real costs;
- ``sub-module``: training through the decoder body (``model.model(...)``, as distillation
  trainers do) draws its own mask per forward, and its gradients equal the detach reference;
- ``eval and generate``: eval outputs and greedy ``generate`` tokens are unchanged.

The pure part (what to compare) is here; DropBP is attached for the checks and removed
afterwards, so the model is left as it was given.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dropbp.architectures import (
    BranchSpec,
    decoder_layers,
    find_config,
    resolve_branches,
)
from dropbp.calibration import unmeasurable_loss
from dropbp.errors import DropBPError
from dropbp.handle import attach_handle, find_handle
from dropbp.masks import sample_mask
from dropbp.reference import detach_branches
from dropbp.tensors import first_tensor, replace_first_tensor
from dropbp.tiny import example_batch, tiny_causal_lm

__all__ = [
    "CallArguments", "CheckReport", "CheckResult", "check", "check_residual_stream", "require_sound_branches",
    "verify_fallback_on_a_tiny_copy",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes:
        name: Short name of the check, e.g. ``"residual stream"``.
        passed: True or False; None when the check does not apply to this model.
        detail: Why, in plain words.
    """

    name: str
    passed: bool | None
    detail: str

    def line(self) -> str:
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        return f"{status}  {self.name}: {self.detail}"


@dataclass
class CheckReport:
    """All checks run on one model.

    Attributes:
        model: What was checked (class name, or the CLI's description).
        branches: Names of the branches checked.
        results: One :class:`CheckResult` per check, in the order they ran.
    """

    model: str
    branches: list[str] = field(default_factory=list)
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (checks that do not apply do not count)."""
        return all(r.passed is not False for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.passed is False]

    def __str__(self) -> str:
        head = f"dropbp check: {self.model}, {len(self.branches)} branches"
        verdict = "all checks passed" if self.ok else f"{len(self.failures)} check(s) failed: do not train with these branches"
        return "\n".join([head, *(r.line() for r in self.results), verdict])


# ------------------------------------------------------------------ inputs and losses
def _is_hf(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "vocab_size")


@dataclass(frozen=True)
class CallArguments:
    """Positional and keyword arguments of one model call, as a forward pre-hook sees them."""

    args: tuple
    kwargs: dict


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, CallArguments):
        return model(*inputs.args, **inputs.kwargs)
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _output_tensor(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    tensor = first_tensor(output)
    if tensor is None:
        raise ValueError("the model's output holds no tensor; pass inputs= that the model's forward accepts")
    return tensor


def _loss(output: Any, seed: int) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    # A fixed random projection of the output, so every element gets its own gradient.
    tensor = _output_tensor(output).float()
    weights = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed + 1)).to(tensor.device)
    return (tensor * weights).sum()


@contextlib.contextmanager
def _same_randomness(seed: int) -> Iterator[None]:
    """Every forward of the check draws the same dropout masks."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _grads(model: nn.Module, inputs: Any, seed: int) -> tuple[Any, list[torch.Tensor | None]]:
    params = [p for p in model.parameters() if p.requires_grad]
    with _same_randomness(seed):
        output = _call(model, inputs)
        loss = _loss(output, seed)
    grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else [None] * len(params)
    return output, list(grads)


def _differs(a: torch.Tensor | None, b: torch.Tensor | None, exact: bool) -> bool:
    if (a is None) != (b is None):
        return True
    if a is None:
        return False
    if exact:
        return not torch.equal(a, b)
    return not torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the stream probe
@dataclass
class _Stream:
    """The residual stream's start (input of the first layer) and end (output of the last)."""

    first: nn.Module
    last: nn.Module
    start: torch.Tensor | None = None
    end: torch.Tensor | None = None
    start_grad: torch.Tensor | None = None
    end_grad: torch.Tensor | None = None


def _find_stream(model: nn.Module) -> _Stream | None:
    found = decoder_layers(model)
    if found is None or len(found[1]) == 0:
        return None
    layers = found[1]
    return _Stream(first=layers[0], last=layers[-1])


@contextlib.contextmanager
def _probe(stream: _Stream) -> Iterator[None]:
    """Record the stream's start and end and their gradients.

    The start is made a leaf that requires grad, so the probe works with frozen
    embeddings (LoRA) too.
    """

    def save_start_grad(grad: torch.Tensor) -> None:
        stream.start_grad = grad

    def save_end_grad(grad: torch.Tensor) -> None:
        stream.end_grad = grad

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if stream.start is not None:
            return None
        if args and isinstance(args[0], torch.Tensor):
            x = args[0].detach().requires_grad_(torch.is_grad_enabled())
            args = (x, *args[1:])
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
            x = kwargs["hidden_states"].detach().requires_grad_(torch.is_grad_enabled())
            kwargs = {**kwargs, "hidden_states": x}
        else:
            return None
        stream.start = x
        if x.requires_grad:
            x.register_hook(save_start_grad)
        return args, kwargs

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        end = first_tensor(output)
        stream.end = end
        if end is not None and end.requires_grad:
            end.register_hook(save_end_grad)

    # prepend: before DropBP's own pre-hook, which turns grad off when the first layer is itself a branch.
    handles = [stream.first.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
               stream.last.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _zero_first_tensor(module: nn.Module, args: tuple, output: Any) -> Any:
    tensor = first_tensor(output)
    if tensor is None:
        return None
    return replace_first_tensor(output, torch.zeros_like(tensor))


@contextlib.contextmanager
def _hooked(modules: Sequence[nn.Module], hook: Callable) -> Iterator[None]:
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_residual_stream(model: nn.Module, handle: Any, inputs: Any, *, seed: int = 0) -> CheckResult:
    """With every branch dropped, the gradient must still run down the residual stream.

    The structural check that :class:`~dropbp.DropBPCallback` and ``dropbp finetune`` run on
    the first batch when the branches came from the generic fallback.

    Args:
        model: The model, with ``handle`` attached and in training mode.
        handle: Its :class:`~dropbp.DropBPHandle`.
        inputs: A batch for the model (a dict of keyword arguments, a tuple or a tensor).
        seed: Seed for dropout draws and the loss projection.

    Returns:
        The result: failed when the stream is cut (no gradient at its start), or when the
        stack is the identity with the branches' outputs zeroed but the gradients at its
        start and end differ; not applicable (``passed=None``) without a layer stack.
    """
    name = "residual stream"
    stream = _find_stream(model)
    if stream is None:
        return CheckResult(name, None, "no layer stack (a ModuleList of same-class blocks) to probe; "
                                       "see 'no residual inside' instead")
    zeroed = _hooked([b.end_module for b in handle.branches], _zero_first_tensor)
    with torch.no_grad(), _same_randomness(seed), _probe(stream), handle.paused(), zeroed:
        _call(model, inputs)
    if stream.start is None or stream.end is None:
        return CheckResult(name, None, "the first layer's input or the last layer's output is not a tensor")
    identity = stream.start.shape == stream.end.shape and torch.equal(stream.start, stream.end)
    stream.start = stream.end = stream.start_grad = stream.end_grad = None
    with handle.forced([True] * len(handle.branches)), torch.enable_grad():
        with _same_randomness(seed), _probe(stream):
            output = _call(model, inputs)
            loss = _loss(output, seed)
        if stream.start is None:
            return CheckResult(name, None, "the first layer's input is not a tensor")
        if loss.requires_grad and stream.start.requires_grad:
            torch.autograd.grad(loss, [stream.start], allow_unused=True)
    start_grad = stream.start_grad
    if start_grad is None or not bool(start_grad.any()):
        return CheckResult(
            name, False,
            "with every branch dropped no gradient reaches the first layer's input: a branch cuts the residual "
            "stream (it adds the residual inside, or it is a whole layer); choose modules whose output is added "
            "to the stream",
        )
    if not identity:
        return CheckResult(name, True, "with every branch dropped the gradient reaches the first layer "
                                       "(the stack is not the identity with zeroed branches, e.g. post-norm)")
    if stream.end_grad is None or not torch.allclose(start_grad, stream.end_grad, rtol=1e-5, atol=1e-7):
        return CheckResult(
            name, False,
            "with every branch dropped the stack should pass the gradient through unchanged, but the gradient at the "
            "first layer's input differs from the one at the last layer's output: a branch adds to the stream "
            "inside itself or something between the branches has parameters on the stream",
        )
    return CheckResult(name, True, "with every branch dropped the gradient at the first layer's input equals the "
                                   "one at the last layer's output (the stack is the identity)")


# ------------------------------------------------------------------ residual inside a branch
def _no_residual_inside(model: nn.Module, handle: Any, inputs: Any, seed: int) -> CheckResult:
    name = "no residual inside"
    seen: dict[int, tuple[list[torch.Tensor], torch.Tensor | None]] = {}

    def record_inputs(index: int) -> Callable:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if index not in seen:
                tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
                seen[index] = (tensors, None)
        return pre

    def record_output(index: int) -> Callable:
        def post(module: nn.Module, args: tuple, output: Any) -> None:
            if index in seen and seen[index][1] is None:
                seen[index] = (seen[index][0], first_tensor(output))
        return post

    saved = []
    handles = []
    try:
        with torch.no_grad():
            for branch in handle.branches:
                for p in branch.parameters():
                    saved.append((p, p.detach().clone()))
                    p.zero_()
                handles.append(branch.module.register_forward_pre_hook(record_inputs(branch.index), with_kwargs=True))
                handles.append(branch.end_module.register_forward_hook(record_output(branch.index)))
            with _same_randomness(seed), handle.paused():
                _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
    adds = []
    for branch in handle.branches:
        tensors, output = seen.get(branch.index, ([], None))
        if output is None or not bool(output.any()):
            continue
        if any(t.shape == output.shape and torch.allclose(t, output, rtol=1e-4, atol=1e-6) for t in tensors):
            adds.append(branch.name)
    if adds:
        more = f" and {len(adds) - 3} more" if len(adds) > 3 else ""
        return CheckResult(
            name, False,
            f"{', '.join(adds[:3])}{more}: returns one of its inputs when its own parameters are zero, so it adds the "
            "residual inside; select spans that end before the add ('<first_proj>..<last_proj>') or the modules inside",
        )
    missing = [b.name for b in handle.branches if b.index not in seen]
    if missing:
        return CheckResult(name, False, f"{missing[0]} never ran in the forward; select modules the model calls")
    return CheckResult(name, True, "no branch returns one of its inputs when its own parameters are zero")


# ------------------------------------------------------------------ the whole check
def _sensitivity_matches_definition(model: nn.Module, handle: Any, inputs: Any, seed: int) -> CheckResult:
    """The fast sensitivity (batched down the layers where it can be) against ``L + 1`` backward passes."""
    name = "sensitivity"
    problem = unmeasurable_loss(model)
    if problem is not None:
        return CheckResult(name, None, problem)

    def closure() -> torch.Tensor:
        return _loss(_call(model, inputs), seed)

    try:
        fast = handle.sensitivity(closure)
        naive = handle.sensitivity(closure, method="naive")
    except (ValueError, RuntimeError) as error:
        return CheckResult(name, False, f"the measurement failed: {str(error).splitlines()[0]}")
    # The definition subtracts two whole gradients, so a tiny S carries that cancellation: judge it against the largest.
    floor = 1e-6 * max(naive, default=0.0) + 1e-30
    worst = max((abs(f - n) / (abs(n) + floor) for f, n in zip(fast, naive)), default=0.0)
    if worst > 1e-3:
        return CheckResult(name, False, f"the fast measurement differs from L + 1 backward passes by up to {worst:.1e} "
                                        "(relative)")
    return CheckResult(name, True, f"the fast measurement equals L + 1 backward passes (largest relative difference "
                                   f"{worst:.0e})")


def _branch_flops(handle: Any) -> CheckResult:
    """Every branch ran in the training forwards, and its counted FLOPs are plausible for its parameters."""
    name = "branch FLOPs"
    missing = [b.name for b in handle.branches if b.flops is None]
    if missing:
        return CheckResult(name, False, f"{missing[0]} never ran in a training forward, so its FLOPs are unknown")
    low = handle.implausible_flops()
    if low:
        return CheckResult(name, False, f"{low[0]} counted under 1% of 2 x parameters x tokens: torch.utils.flop_counter "
                                        "misses its kernel, so allocation and backward_flops_skipped would be wrong")
    config = find_config(handle.model)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    detail = "every branch counted at least 1% of 2 x parameters x tokens"
    if experts:
        biggest = max(handle.branches, key=lambda b: b.flops)
        detail += f" ({experts} experts; the largest branch, {biggest.name}, counted {biggest.flops:,} FLOPs)"
    return CheckResult(name, True, detail)


def _through_a_sub_module(handle: Any, inputs: Any, seed: int) -> CheckResult:
    """Training through the innermost module that holds every branch draws a mask and equals the reference."""
    name = "sub-module"
    inner = [m for m in handle.entry_modules[1:] if not isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    if not inner or not isinstance(inputs, dict) or "input_ids" not in inputs:
        return CheckResult(name, None, "no module inside the model holds every branch, or the batch has no input_ids")
    body = inner[-1]
    body_inputs = {"input_ids": inputs["input_ids"]}
    count = len(handle.branches)
    auto_step, rates = handle.auto_step, handle.drop_rates
    handle.set_drop_rates(0.5)
    step = handle.step_count
    mask = sample_mask(handle.seed, step, handle.drop_rates)
    try:
        with handle.paused(), detach_branches([b.end_module for b in handle.branches], mask):
            _, expected = _grads(body, body_inputs, seed)
        handle.auto_step = True
        _, got = _grads(body, body_inputs, seed)
    except Exception as error:  # noqa: BLE001 - a body that cannot run alone is reported, not raised
        return CheckResult(name, None, f"{type(body).__name__} does not run on input_ids alone "
                                       f"({type(error).__name__}: {' '.join(str(error).split())[:120]})")
    finally:
        handle.auto_step = auto_step
        handle.set_drop_rates(rates)
    if handle.step_count != step + 1:
        return CheckResult(name, False, f"a training forward of {type(body).__name__} drew {handle.step_count - step} "
                                        "masks instead of one")
    handle.load_state_dict({**handle.state_dict(), "step": step, "mask": [False] * count})
    if any(_differs(g, r, exact=False) for g, r in zip(got, expected)):
        return CheckResult(name, False, f"gradients through {type(body).__name__} differ from the detach reference")
    return CheckResult(name, True, f"a training forward of {type(body).__name__} alone draws its own mask; "
                                   f"gradients equal the detach reference ({sum(mask)} of {count} branches dropped)")


def _random_mask(count: int, generator: torch.Generator) -> list[bool]:
    mask = (torch.rand(count, generator=generator) < 0.5).tolist()
    if count >= 2:  # at least one branch dropped and one kept, so both halves of the check bite
        mask[0], mask[-1] = True, False
    return mask


def _describe(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} ({model_type})" if model_type else type(model).__name__


def check(
    model: nn.Module,
    branches: Sequence[str] | str | None = None,
    *,
    inputs: Any = None,
    seed: int = 0,
    generate: bool = True,
) -> CheckReport:
    """Verify that DropBP trains ``model`` exactly with the given branches.

    Run it once on any model before training with it, on a tiny version
    (:func:`dropbp.tiny.tiny_causal_lm`) or the real one. DropBP is attached for the
    checks and removed afterwards; weights, train/eval mode and RNG state are left as found.

    Args:
        model: The model, without DropBP attached.
        branches: Branch patterns as for :func:`dropbp.apply`; None finds them as ``apply`` does.
        inputs: A batch for ``model`` (dict of keyword arguments, tuple of positional
            arguments, or one tensor). Hugging Face models get random token ids by default;
            other modules need it. Without a ``loss`` in the output, the loss is a fixed
            random projection of the first output tensor.
        seed: Seed of the random masks, token ids and dropout draws.
        generate: Also compare greedy ``generate`` tokens (Hugging Face generative models).

    Returns:
        A :class:`CheckReport`; ``report.ok`` is False when any check failed, and
        ``str(report)`` gives one line per check.

    Raises:
        ValueError: If DropBP is already attached to ``model``, or a plain module gets no ``inputs``.
    """
    if find_handle(model) is not None:
        raise ValueError("DropBP is already attached to this model; call handle.remove() before dropbp.check(model)")
    if inputs is None:
        if not _is_hf(model):
            raise ValueError("dropbp.check needs inputs= for a model without a Hugging Face config "
                             "(a tensor, a tuple of arguments or a dict of keyword arguments)")
        inputs = example_batch(model, seed=seed)
    report = CheckReport(_describe(model))
    try:
        specs: list[BranchSpec] = resolve_branches(model, branches)
    except ValueError as error:
        report.results.append(CheckResult("branches", False, str(error)))
        return report
    report.branches = [s.name for s in specs]
    report.results.append(CheckResult("branches", True, f"{len(specs)} found, none nested, none takes the residual "
                                                        "as an argument"))
    was_training = model.training
    rng = torch.random.get_rng_state()
    try:
        model.train()
        reference_output, reference_grads = _grads(model, inputs, seed)
        reference_logits = _output_tensor(reference_output).detach()
        eval_reference = generated = None
        model.eval()
        with torch.no_grad(), _same_randomness(seed):
            eval_reference = _output_tensor(_call(model, inputs)).detach()
        prompt = inputs.get("input_ids") if isinstance(inputs, dict) else None
        can_generate = generate and prompt is not None and callable(getattr(model, "generate", None)) \
            and getattr(model, "can_generate", lambda: False)()
        if can_generate:
            generated = _generate(model, prompt)
        model.train()
        # Not dropbp.apply: its verification of fallback branches would refuse what this reports on.
        handle = attach_handle(model, branches, auto_step=False, drop_rate=0.0)
        try:
            _run_checks(report, model, handle, inputs, seed, reference_logits, reference_grads,
                        eval_reference, generated, prompt)
        finally:
            handle.remove()
    finally:
        model.train(was_training)
        torch.random.set_rng_state(rng)
    return report


def _structured_mask_is_exact(model: nn.Module, handle: Any, inputs: Any, seed: int,
                              reference_grads: list) -> CheckResult:
    """With the lower half of the branches dropped (a structured mask), the upper half's gradients are exact.

    Informational: where they are not (a later branch's parameters also act below the cut), structured
    masks still train as DropBP does (the detach reference), only without their advantage, so the row
    is "not applicable" rather than failed.
    """
    count = len(handle.branches)
    cut = count // 2
    handle.set_mask([i < cut for i in range(count)])
    _, grads = _grads(model, inputs, seed)
    handle.set_mask([False] * count)
    params = [p for p in model.parameters() if p.requires_grad]
    index = {id(p): i for i, p in enumerate(params)}
    names = {id(p): n for n, p in model.named_parameters()}
    kept = [p for b in handle.branches[cut:] for p in b.parameters() if id(p) in index]
    wrong = [p for p in kept if _differs(grads[index[id(p)]], reference_grads[index[id(p)]], exact=False)]
    if wrong:
        return CheckResult("structured masks", None, f"not exact here: with the lowest {cut} of {count} branches "
                                                     f"dropped, {names[id(wrong[0])]} above them gets a gradient "
                                                     "that differs from the full backward's; prefer mask='random'")
    return CheckResult("structured masks", True, f"with the lowest {cut} of {count} branches dropped, the "
                                                 f"{len(kept)} parameter gradients above them equal the full backward's")


def _generate(model: nn.Module, prompt: torch.Tensor) -> torch.Tensor | None:
    try:
        with torch.no_grad():
            return model.generate(prompt[:1], max_new_tokens=4, do_sample=False,
                                  pad_token_id=getattr(model.config, "pad_token_id", None) or 0)
    except Exception:  # noqa: BLE001 - a model that cannot generate on its own here is not DropBP's concern
        return None


def _run_checks(report: CheckReport, model: nn.Module, handle: Any, inputs: Any, seed: int,
                reference_logits: torch.Tensor, reference_grads: list, eval_reference: torch.Tensor,
                generated: torch.Tensor | None, prompt: torch.Tensor | None) -> None:
    results = report.results
    count = len(handle.branches)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]

    # Forward: bitwise equal under random masks.
    changed = 0
    for _ in range(3):
        handle.set_mask(_random_mask(count, generator))
        with torch.no_grad(), _same_randomness(seed):
            logits = _output_tensor(_call(model, inputs)).detach()
        changed += not torch.equal(logits, reference_logits)
    results.append(CheckResult("forward unchanged", changed == 0,
                               "outputs are bitwise equal under 3 random masks" if changed == 0 else
                               f"outputs differ from the model without DropBP under {changed} of 3 random masks"))

    # Drop rate 0: nothing changes.
    handle.set_mask([False] * count)
    _, grads = _grads(model, inputs, seed)
    differing = [i for i, (g, r) in enumerate(zip(grads, reference_grads)) if _differs(g, r, exact=True)]
    results.append(CheckResult("drop rate 0", not differing,
                               "gradients are bitwise equal to the model without DropBP" if not differing else
                               f"{len(differing)} of {len(params)} parameter gradients differ from the model "
                               "without DropBP"))

    # Dropped branches: their own parameters get none; the rest equal the detach reference.
    mask = _random_mask(count, generator)
    with handle.paused(), detach_branches([b.end_module for b in handle.branches], mask):
        _, detach_grads = _grads(model, inputs, seed)
    handle.set_mask(mask)
    _, grads = _grads(model, inputs, seed)
    own = {id(p) for b, dropped in zip(handle.branches, mask) if dropped for p in b.parameters()}
    leaked = [i for i, p in enumerate(params) if id(p) in own and grads[i] is not None]
    wrong = [i for i, (p, g, r) in enumerate(zip(params, grads, detach_grads))
             if id(p) not in own and _differs(g, r, exact=False)]
    names = {id(p): n for n, p in model.named_parameters()}
    if leaked:
        detail = f"{names[id(params[leaked[0]])]} belongs to a dropped branch but got a gradient"
    elif wrong:
        detail = (f"{len(wrong)} gradients differ from the detach reference at the same mask, first "
                  f"{names[id(params[wrong[0]])]}")
    else:
        detail = (f"{sum(mask)} of {count} branches dropped: their parameters get no gradient, the other gradients "
                  "equal the detach reference")
    results.append(CheckResult("dropped branches", not leaked and not wrong, detail))

    results.append(_structured_mask_is_exact(model, handle, inputs, seed, reference_grads))
    results.append(check_residual_stream(model, handle, inputs, seed=seed))
    results.append(_no_residual_inside(model, handle, inputs, seed))
    handle.set_mask([False] * count)
    results.append(_sensitivity_matches_definition(model, handle, inputs, seed))
    results.append(_branch_flops(handle))
    results.append(_through_a_sub_module(handle, inputs, seed))

    # Eval and generate: DropBP attached changes nothing.
    model.eval()
    try:
        with torch.no_grad(), _same_randomness(seed):
            logits = _output_tensor(_call(model, inputs)).detach()
        same_eval = torch.equal(logits, eval_reference)
        tokens = _generate(model, prompt) if generated is not None else None
        same_tokens = generated is None or (tokens is not None and torch.equal(tokens, generated))
    finally:
        model.train()
    if not same_eval:
        detail = "eval outputs differ with DropBP attached"
    elif not same_tokens:
        detail = "greedy generate tokens differ with DropBP attached"
    else:
        detail = "eval outputs" + (" and greedy generate tokens" if generated is not None else "") + \
            " are bitwise equal with DropBP attached"
    results.append(CheckResult("eval and generate", same_eval and same_tokens, detail))


def require_sound_branches(model: nn.Module, handle: Any, inputs: Any) -> None:
    """Refuse to train when branches found by the generic fallback would cut the residual stream.

    Runs the structural checks (``residual stream`` and ``no residual inside``) on one
    batch; :class:`~dropbp.DropBPCallback` and ``dropbp finetune`` call it on the first
    training batch when ``handle.branch_source == "fallback"``. Nothing else changes: the
    mask stream does not advance and the RNG state is restored.

    Args:
        model: The model with ``handle`` attached.
        handle: Its :class:`~dropbp.DropBPHandle`.
        inputs: A training batch (dict of keyword arguments, tuple, tensor or
            :class:`CallArguments`).

    Raises:
        DropBPError: If either check fails; the message says which branch and why.
    """

    was_training = model.training
    model.train()
    try:
        results = [check_residual_stream(model, handle, inputs), _no_residual_inside(model, handle, inputs, seed=0)]
    finally:
        model.train(was_training)
    failed = [r for r in results if r.passed is False]
    if failed:
        raise _unsafe(failed[0])


def verify_fallback_on_a_tiny_copy(model: nn.Module) -> None:
    """Refuse a model whose generic-fallback branches fail :func:`check` on a tiny copy.

    :func:`dropbp.apply` calls it when the branches come from the generic fallback, so no
    architecture outside the table trains with branches that cut the residual stream, in a
    Trainer or a loop of one's own. The copy is a tiny random model of the same class,
    built from the model's config shrunk by :func:`dropbp.tiny.shrink_config` (a fraction
    of a second on CPU). Where no copy can be built (code outside transformers' auto
    classes), nothing is checked here; ``DropBPCallback`` and ``dropbp finetune`` still
    check the first training batch. The global RNG state is left as it was.

    Args:
        model: The model ``dropbp.apply`` was given.

    Raises:
        DropBPError: If any check fails on the copy (for example its fallback branches cut
            the residual stream), or the copy trains without DropBP but fails with it.
    """

    name = type(model).__name__
    config = find_config(model)
    if config is None:
        logger.info("DropBP: %s is not in the architecture table and has no Hugging Face config, so its generic "
                    "fallback branches are not verified on a tiny copy; the Trainer callback and dropbp finetune "
                    "verify them on the first batch", name)
        return
    logger.info("DropBP: %s (model_type %r) is not in the architecture table: verifying the generic fallback's "
                "branches on a tiny random copy of it", name, getattr(config, "model_type", None))
    with torch.random.fork_rng(devices=[]):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tiny = tiny_causal_lm(config)
                batch = example_batch(tiny)
                _call(tiny, batch).loss.backward()  # the copy must train without DropBP first
                tiny.zero_grad(set_to_none=True)
        except Exception as error:  # noqa: BLE001 - no working copy: the first-batch check in training remains
            logger.info("DropBP: no tiny copy of %s trains (%s: %s), so the fallback branches are not verified "
                        "here; the Trainer callback and dropbp finetune verify them on the first batch", name,
                        type(error).__name__, " ".join(str(error).split())[:200])
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = check(tiny, None, inputs=batch, seed=0, generate=False)
        except Exception as error:
            raise DropBPError(
                f"could not verify the generic fallback's branches on a tiny copy of the model, which fails with "
                f"DropBP attached ({type(error).__name__}: {' '.join(str(error).split())[:200]}); pass branches= "
                "patterns and check them with dropbp.check(model, branches=...)"
            ) from error
    if not report.ok:
        raise _unsafe(report.failures[0])


def _unsafe(failure: CheckResult) -> DropBPError:
    return DropBPError(
        f"the branches found by the generic fallback are unsafe ({failure.name}: {failure.detail}); "
        "pass branches= patterns and verify them with dropbp.check(model, branches=...)"
    )
