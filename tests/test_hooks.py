"""The hook objects: copies, garbage collection, threads and replicas."""

from __future__ import annotations

import copy
import gc
import threading
import weakref

import pytest
import torch
from conftest import tiny_llama
from helpers import assert_same_grads, detach_reference_grads, parameter_grads

import dropbp


def grads_of(model, x) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    model(x, labels=x).loss.backward()
    return parameter_grads(model, trainable_only=True)


def reference_grads(model, mask: list[bool], x) -> dict[str, torch.Tensor | None]:
    return detach_reference_grads(model, mask, lambda reference: reference(x, labels=x).loss)


def test_a_deep_copy_gets_its_own_working_handle(batch):
    model = tiny_llama()
    model.train()
    handle = dropbp.apply(model, auto_step=False, seed=5)
    handle.set_mask([True, False] * 3)
    model(batch, labels=batch).loss.backward()  # some history to copy: FLOPs, mask, step

    clone = copy.deepcopy(model)
    clone_handle = dropbp.find_handle(clone)
    assert clone_handle is not None and clone_handle is not handle
    assert clone_handle.model is clone
    assert [b.module for b in clone_handle.branches] == [clone.get_submodule(b.name) for b in handle.branches]
    assert clone_handle.mask == handle.mask and clone_handle.seed == 5 and clone_handle.flops == handle.flops
    with pytest.raises(ValueError, match="already applied"):
        dropbp.apply(clone)

    # Each follows its own mask.
    handle.set_mask([False, True] * 3)
    clone_handle.set_mask([True, True, False, False, True, False])
    assert_same_grads(grads_of(clone, batch), reference_grads(clone, clone_handle.mask, batch))
    assert_same_grads(grads_of(model, batch), reference_grads(model, handle.mask, batch))

    clone_handle.remove()  # the original keeps working
    assert dropbp.find_handle(clone) is None
    assert_same_grads(grads_of(model, batch), reference_grads(model, handle.mask, batch))


def test_a_model_with_dropbp_is_garbage_collected(batch):
    model = tiny_llama()
    model.train()
    handle = dropbp.apply(model)
    model(batch, labels=batch).loss.backward()
    dead = weakref.ref(model)
    del model, handle
    gc.collect()
    assert dead() is None


def test_find_handle_sees_the_handle_from_inside_and_outside():
    model = tiny_llama()
    handle = dropbp.apply(model.model, branches=["layers.*.self_attn", "layers.*.mlp"])  # the body inside the LM
    assert dropbp.find_handle(model) is handle
    assert dropbp.find_handle(model.model.layers[0]) is handle
    handle.remove()
    assert dropbp.find_handle(model) is None


def test_forwards_in_several_threads_each_get_their_own_state(batch):
    """Concurrent training forwards: no crash, grad mode restored, each gradient exact."""
    model = tiny_llama()
    model.train()
    handle = dropbp.apply(model, auto_step=False)
    handle.set_mask([True, False, False, True, True, False])
    params = [p for p in model.parameters()]
    expected = reference_grads(model, handle.mask, batch)

    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                loss = model(batch, labels=batch).loss
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                results.append((torch.is_grad_enabled(), grads))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 20
    for grad_enabled, grads in results:
        assert grad_enabled
        assert_same_grads(dict(zip(expected, grads)), expected)


def test_auto_step_in_threads_takes_each_step_once(batch):
    model = tiny_llama()
    model.train()
    handle = dropbp.apply(model)

    def work():
        for _ in range(10):
            model(batch, labels=batch)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert handle.step_count == 30


def test_a_shallow_replica_is_refused_as_data_parallel_would_make_it(batch):
    """nn.DataParallel runs shallow replicas that share the hooks in threads: refused clearly."""
    model = tiny_llama()
    model.train()
    dropbp.apply(model)
    replica = model._replicate_for_data_parallel()
    with pytest.raises(RuntimeError, match="DropBP: the model was copied without its DropBP state"):
        replica(batch, labels=batch)
    replica.eval()
    with torch.no_grad():  # inference on a replica is untouched
        assert torch.equal(replica(batch).logits, model.eval()(batch).logits)


def test_a_branch_that_returns_a_namedtuple_keeps_its_type():
    """Reformer's attention returns a namedtuple; the anchor that keeps the loss differentiable must not make it a tuple."""
    from collections import namedtuple

    Output = namedtuple("Output", ["hidden_states", "weights"])

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return Output(self.proj(x), None)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

        def forward(self, x):
            return x + self.attn(x).hidden_states  # attribute access: a plain tuple would fail here

    model = Net()
    handle = dropbp.apply(model, branches=["attn"], auto_step=False)
    handle.set_mask([True])  # the only trainable branch dropped: the anchor path
    loss = model(torch.randn(2, 4)).sum()
    loss.backward()
    assert model.attn.proj.weight.grad is None
