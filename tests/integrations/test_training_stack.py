"""Training-stack compatibility that runs on one CPU process: autocast and gradient checkpointing."""

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, get_peft_model

import dropbp
from dropbp.checkpointing import in_backward

MASK = [True, False, False, True, True, False]


def fixed_mask_grads(model, batch, mask):
    handle = dropbp.apply(model, auto_step=False)
    handle.set_mask(mask)
    model.train()
    loss = model(batch, labels=batch).loss
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return loss, grads, handle


def test_bf16_autocast_keeps_mask_semantics(batch):
    model = tiny_llama()
    handle = dropbp.apply(model, auto_step=False)
    handle.set_mask(MASK)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch, labels=batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    for branch, dropped in zip(handle.branches, MASK):
        assert all((p.grad is None) == dropped for p in branch.parameters()), branch.name


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_matches_plain_backward(batch, reentrant):
    _, expected, _ = fixed_mask_grads(tiny_llama(), batch, MASK)
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    _, got, _ = fixed_mask_grads(model, batch, MASK)
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] is None) == (got[name] is None), name
        if expected[name] is not None:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_every_branch_dropped_under_checkpointing(batch, reentrant):
    model = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad_(".self_attn." in name or ".mlp." in name)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # what PEFT does for frozen embeddings
    loss, grads, _ = fixed_mask_grads(model, batch, [True] * 6)
    assert torch.isfinite(loss) and all(g is None for g in grads.values())


def count_backward_starts(handle):
    """Per branch, how many times its forward started inside a backward (a checkpoint recompute)."""
    starts = [0] * len(handle.branches)

    def count(index):
        def hook(module, args):
            starts[index] += in_backward()
        return hook

    for branch in handle.branches:
        # A child module: its pre-hook fires only when the branch's own forward really runs.
        inner = next(iter(branch.module.children()))
        inner.register_forward_pre_hook(count(branch.index))
    return starts


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("replay", [True, False])
def test_dropped_branches_are_not_recomputed_under_checkpointing(batch, reentrant, replay):
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    handle = dropbp.apply(model, auto_step=False, replay=replay)
    handle.set_mask(MASK)
    starts = count_backward_starts(handle)
    model.train()
    loss = model(batch, labels=batch).loss
    kept = [n == 1 for n in handle.kept_for_replay]
    loss.backward()
    recomputed_dropped = [s for s, dropped in zip(starts, MASK) if dropped]
    if replay:
        # Reentrant recomputes whole layers; non-reentrant stops early and never reaches a dropped MLP
        # (the last branch of its layer), so no output is kept for it.
        expected = [True, False, False, True, True, False] if reentrant else [True, False, False, False, True, False]
        assert kept == expected
        assert not any("forward" in b.module.__dict__ for b in handle.branches)  # every kept output was replayed
    if replay:
        assert recomputed_dropped == [0, 0, 0]
    else:  # the switch the benchmark uses: without the replay, dropped attention is recomputed
        assert sum(recomputed_dropped) >= 2
    if reentrant:  # a reentrant recompute re-runs every kept branch
        assert all(s == 1 for s, dropped in zip(starts, MASK) if not dropped)
    # Nothing is left shadowed once the next training forward or remove() runs.
    handle.set_mask([False] * len(MASK))
    model(batch, labels=batch)
    assert not any("forward" in b.module.__dict__ for b in handle.branches)
    handle.set_mask(MASK)
    model(batch, labels=batch)
    handle.remove()
    assert not any("forward" in b.module.__dict__ for b in handle.branches)


@pytest.mark.parametrize("reentrant", [False, True])
def test_replay_keeps_dropout_draws_exact(batch, reentrant):
    """Dropout inside a dropped branch: the replay moves the RNG as the recompute would have.

    LoRA dropout in a kept MLP draws after the dropped attention of the same layer, so a
    replay that left the RNG behind would recompute different dropout masks there.
    """
    def grads(checkpointing):
        model = tiny_llama(attention_dropout=0.3)
        targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=0.3))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        handle = dropbp.apply(model, auto_step=False)
        handle.set_mask(MASK)
        starts = count_backward_starts(handle)
        model.train()
        torch.manual_seed(5)
        model(batch, labels=batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}, starts

    expected, _ = grads(checkpointing=False)
    got, starts = grads(checkpointing=True)
    assert [s for s, dropped in zip(starts, MASK) if dropped] == [0, 0, 0]
    for name in expected:
        assert (expected[name] is None) == (got[name] is None), name
        if expected[name] is not None:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("where", ["model", "layer"])
def test_torch_compile_training_is_refused_with_a_clear_error(batch, where):
    model = tiny_llama()
    handle = dropbp.apply(model)
    model.train()
    if where == "model":
        compiled = torch.compile(model, backend="eager")
    else:  # one compiled decoder layer inside an eager model
        model.model.layers[1].compile(backend="eager")
        compiled = model
    with pytest.raises(RuntimeError, match="DropBP: torch.compile is not supported for training"):
        compiled(batch, labels=batch)
    # Compiled inference with DropBP attached is unaffected, and remove() makes training compile.
    model.eval()
    with torch.no_grad():
        assert torch.equal(compiled(batch).logits, model(batch).logits)
    handle.remove()
    model.train()
    assert torch.isfinite(compiled(batch, labels=batch).loss)


def test_apply_refuses_a_compiled_model():
    with pytest.raises(ValueError, match="torch.compile"):
        dropbp.apply(torch.compile(tiny_llama(), backend="eager"))


def test_sensitivity_under_checkpointing(batch):
    """Checkpointing gives the same sensitivities, up to rounding: without checkpointing the partial
    backwards run batched down the layers, with it one by one. Reentrant checkpointing cannot run
    autograd.grad, so the measurement switches it to non-reentrant and back."""
    def sensitivity(reentrant):
        model = tiny_llama()
        if reentrant is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        handle = dropbp.apply(model)
        model.train()
        return handle.sensitivity(lambda: model(batch, labels=batch).loss)

    plain = sensitivity(reentrant=None)
    assert sensitivity(reentrant=False) == pytest.approx(plain, rel=1e-6)
    assert sensitivity(reentrant=True) == pytest.approx(plain, rel=1e-6)


class SharedBranchModel(torch.nn.Module):
    """One checkpointed layer that calls its MLP branch twice (weight sharing)."""

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gradient_checkpointing = True
            self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
            self.out = torch.nn.Linear(8, 8)

        def body(self, x):
            h = x + self.mlp(x)
            h = h + self.mlp(torch.sin(h))
            return self.out(h)

        def forward(self, x):
            if self.gradient_checkpointing:
                return torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=True)
            return self.body(x)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([self.Layer()])

    def forward(self, x):
        return self.layers[0](x).pow(2).mean()


def test_a_branch_called_twice_is_recomputed_not_replayed():
    x = torch.randn(4, 8, requires_grad=True)
    grads = []
    for checkpointing in (False, True):
        model = SharedBranchModel()
        model.layers[0].gradient_checkpointing = checkpointing
        handle = dropbp.apply(model, branches=["layers.*.mlp"], auto_step=False)
        handle.set_mask([True])
        loss = model(x)
        assert handle.kept_for_replay == [0]  # the second call made the replay ambiguous
        loss.backward()  # reentrant checkpointing does not support autograd.grad
        grads.append([p.grad for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        assert (plain is None) == (checkpointed is None)
        if plain is not None:
            torch.testing.assert_close(checkpointed, plain)
