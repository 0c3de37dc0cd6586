"""Call patterns x gradient checkpointing x auto_step: every gradient equals the same pattern
without checkpointing, or DropBP raises. Each training forward keeps its own mask and kept
outputs, whatever runs between it and its backward."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from conftest import tiny_llama
from helpers import assert_same_grads as assert_same_parameter_grads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dropbp
from dropbp.masks import sample_mask
from dropbp.reference import detach_branches

LAYERS = 4  # every_n_layers=2 leaves two of them unchecked
CHECKPOINTING = {
    "none": None,
    "reentrant": dict(kwargs={"use_reentrant": True}),
    "non_reentrant": dict(kwargs={"use_reentrant": False}),
    "reentrant_every_2": dict(kwargs={"use_reentrant": True}, every_n_layers=2),
    "non_reentrant_every_2": dict(kwargs={"use_reentrant": False}, every_n_layers=2),
}


def batches(n: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(0, 64, (2, 10), generator=generator) for _ in range(n)]


def build(checkpointing: str, auto_step: bool):
    model = tiny_llama(layers=LAYERS)
    setting = CHECKPOINTING[checkpointing]
    if setting is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=setting["kwargs"], every_n_layers=setting.get("every_n_layers", 1)
        )
    model.train()
    handle = dropbp.apply(model, drop_rate=0.5, seed=3, auto_step=auto_step)
    if not auto_step:
        handle.set_mask([i % 3 == 0 for i in range(len(handle.branches))])
    return model, handle


def loss_of(model, x):
    return model(x, labels=x).loss


def one(model, a, b):
    loss_of(model, a).backward()


def two_forwards_one_backward(model, a, b):
    (loss_of(model, a) + loss_of(model, b)).backward()


def two_backwards_in_order(model, a, b):
    first, second = loss_of(model, a), loss_of(model, b)
    first.backward()
    second.backward()


def two_backwards_reversed(model, a, b):
    first, second = loss_of(model, a), loss_of(model, b)
    second.backward()
    first.backward()


def accumulation(model, a, b):
    loss_of(model, a).backward()
    loss_of(model, b).backward()


def eval_between(model, a, b):
    loss = loss_of(model, a)
    model.eval()
    with torch.no_grad():
        model(b)
    model.train()
    loss.backward()


def generate_between(model, a, b):
    loss = loss_of(model, a)
    model.generate(b[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    loss.backward()


def no_grad_training_mode_between(model, a, b):
    loss = loss_of(model, a)
    with torch.no_grad():
        model(b)  # a reference forward in training mode (as DPO-style trainers do)
    loss.backward()


def through_the_decoder(model, a, b):
    """Training through a sub-module, as distillation trainers and fused cross-entropy losses do."""
    model.model(input_ids=a).last_hidden_state.pow(2).mean().backward()
    model.model(input_ids=b).last_hidden_state.pow(2).mean().backward()


def trainable_attention_only(model, a, b):
    """Trainable parameters in a subset of the branches (PEFT's default LoRA targets attention only)."""
    for name, p in model.named_parameters():
        p.requires_grad_("self_attn" in name)
    model.enable_input_require_grads()  # what PEFT does for gradient checkpointing
    for _ in range(4):
        loss_of(model, a).backward()


PATTERNS = [one, two_forwards_one_backward, two_backwards_in_order, two_backwards_reversed, accumulation,
            eval_between, generate_between, no_grad_training_mode_between, through_the_decoder,
            trainable_attention_only]


def run(pattern, checkpointing: str, auto_step: bool):
    model, handle = build(checkpointing, auto_step)
    a, b, _ = batches()
    pattern(model, a, b)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return grads, handle, model


def assert_same_grads(got: dict, expected: dict) -> None:
    assert_same_parameter_grads(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("auto_step", [True, False])
@pytest.mark.parametrize("checkpointing", [c for c in CHECKPOINTING if c != "none"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.__name__)
def test_pattern_equals_the_same_pattern_without_checkpointing(pattern, checkpointing, auto_step):
    expected, plain_handle, _ = run(pattern, "none", auto_step)
    got, handle, model = run(pattern, checkpointing, auto_step)
    assert handle.step_count == plain_handle.step_count
    assert_same_grads(got, expected)
    # Nothing of these forwards is left behind once their backwards ran.
    del model
    gc.collect()
    assert handle.kept_for_replay == [0] * len(handle.branches)
    assert not any("forward" in b.module.__dict__ for b in handle.branches)


def test_each_forward_keeps_its_own_mask_whatever_the_backward_order():
    """Without checkpointing too: two forwards, backwards reversed, against the detach reference."""
    a, b, _ = batches()
    model, handle = build("none", auto_step=True)
    first, second = loss_of(model, a), loss_of(model, b)
    second.backward()
    first.backward()
    masks = [sample_mask(3, step, handle.drop_rates) for step in (0, 1)]
    assert masks[0] != masks[1]  # otherwise this test could not tell the forwards apart

    reference = tiny_llama(layers=LAYERS)
    reference.train()
    modules = [branch.module for branch in handle.branches]
    modules = [reference.get_submodule(name) for name in (b.name for b in handle.branches)]
    for x, mask in zip((a, b), masks):
        with detach_branches(modules, mask):
            loss_of(reference, x).backward()
    assert_same_grads({n: p.grad for n, p in model.named_parameters()},
                      {n: p.grad for n, p in reference.named_parameters()})


def test_every_n_layers_keeps_nothing_for_layers_that_are_not_checkpointed():
    model, handle = build("non_reentrant_every_2", auto_step=False)
    handle.set_mask([True, False] * LAYERS)  # every attention dropped, every MLP kept
    loss = loss_of(model, batches()[0])
    # Only checkpointed layers (0 and 2) will recompute their dropped attention.
    assert handle.kept_for_replay == [1, 0, 0, 0, 1, 0, 0, 0]
    loss.backward()
    assert handle.kept_for_replay == [0] * 2 * LAYERS
    assert not any("forward" in b.module.__dict__ for b in handle.branches)


class Residual(torch.nn.Module):
    """Two residual blocks with dropout: x = x + block(x), twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.3)) for _ in range(2)]
        )

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x.pow(2).sum()


def shared_input_grads(masks, checkpointed: bool):
    model = Residual()
    handle = dropbp.apply(model, branches=["blocks.0", "blocks.1"], auto_step=False)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    torch.manual_seed(7)
    losses = []
    for mask in masks:
        handle.set_mask(mask)
        call = (lambda m, t: torch.utils.checkpoint.checkpoint(m, t, use_reentrant=False)) if checkpointed else (
            lambda m, t: m(t))
        losses.append(call(model, x))
    sum(losses).backward()
    return [p.grad for p in model.parameters()] + [x.grad]


def test_one_tensor_fed_to_two_forwards_with_the_same_mask_is_exact():
    """Which forward a recompute belongs to is unknown, but both decide alike: no replay, exact."""
    masks = [[True, False], [True, False]]
    for got, want in zip(shared_input_grads(masks, True), shared_input_grads(masks, False)):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want)


def test_a_recompute_that_cannot_be_matched_to_one_of_two_masks_is_refused():
    """One tensor fed into two forwards with different masks, whole model checkpointed: DropBP raises."""
    with pytest.raises(RuntimeError, match="DropBP: cannot tell which of 2 pending training forwards"):
        shared_input_grads([[True, False], [False, True]], True)


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("forward"), st.integers(0, 2)),
        st.tuples(st.just("backward"), st.integers(0, 3)),
        st.tuples(st.just("eval"), st.integers(0, 2)),
        st.tuples(st.just("set_mask"), st.integers(0, 255)),
    ),
    min_size=1,
    max_size=8,
)


def replay_operations(checkpointing: str, auto_step: bool, operations) -> tuple[dict, int]:
    model, handle = build(checkpointing, auto_step)
    xs = batches()
    pending: list[torch.Tensor] = []
    for op, arg in operations:
        if op == "forward":
            pending.append(loss_of(model, xs[arg]))
        elif op == "backward" and pending:
            pending.pop(arg % len(pending)).backward()
        elif op == "eval":
            model.eval()
            with torch.no_grad():
                model(xs[arg])
            model.train()
        elif op == "set_mask":
            handle.set_mask([bool(arg >> i & 1) for i in range(len(handle.branches))])
    for loss in pending:
        loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, handle.step_count


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS, checkpointing=st.sampled_from(["reentrant", "non_reentrant", "non_reentrant_every_2"]),
       auto_step=st.booleans())
def test_any_sequence_of_calls_equals_it_without_checkpointing(operations, checkpointing, auto_step):
    expected, steps = replay_operations("none", auto_step, operations)
    got, got_steps = replay_operations(checkpointing, auto_step, operations)
    assert got_steps == steps
    assert_same_grads(got, expected)


def test_a_deep_copy_made_between_forward_and_backward_is_refused_while_outputs_are_kept():
    model, handle = build("reentrant", auto_step=False)
    loss = loss_of(model, batches()[0])
    with pytest.raises(RuntimeError, match="DropBP: cannot copy the model while outputs are kept"):
        copy.deepcopy(model)
    loss.backward()
    copy.deepcopy(model)  # fine once the recompute has replayed them


def test_kept_bytes_are_the_dropped_outputs_until_the_recompute():
    model, handle = build("reentrant", auto_step=False)
    handle.set_mask([True, False] * LAYERS)  # every attention dropped: each keeps its output
    x = batches()[0]
    loss = loss_of(model, x)
    hidden = model.config.hidden_size * x.numel() * 4  # one fp32 attention output per layer
    assert handle.kept_for_replay_bytes() == LAYERS * hidden
    loss.backward()
    assert handle.kept_for_replay_bytes() == 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_batches_the_caller_keeps_do_not_confuse_a_later_recompute(reentrant):
    """A training loop that keeps its batches (for logging, or for the sensitivity measurement).

    Their tensors keep the earlier forwards' records alive. Under saved-tensor hooks that
    hand back new tensors (activation offloading, compression) no record links the recompute to its
    forward; it must still pick the forward whose backward is running, not refuse.
    """
    from peft import LoraConfig, get_peft_model

    def train(checkpointing: bool):
        model = get_peft_model(tiny_llama(layers=LAYERS), LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        dropbp.apply(model, drop_rate=0.5, seed=5)
        kept, grads = [], []
        for x in batches(3):
            batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
            # saved-tensor hooks that hand back copies, as activation offloading or compression does
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
                loss = model(**batch).loss
            loss.backward()
            kept.append(batch)
            grads.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
            model.zero_grad(set_to_none=True)
        return grads

    for got, expected in zip(train(True), train(False)):
        assert_same_grads(got, expected)
