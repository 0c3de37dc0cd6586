"""Training-stack compatibility that runs on one CPU process: autocast and gradient checkpointing."""

import pytest
import torch
from conftest import tiny_llama

import dropbp

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
