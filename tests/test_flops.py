import pytest
import torch
import torch.nn.functional as F

from dropbp.flops import flop_counter, sdpa_forward_flops


def test_cpu_sdpa_counts_what_the_explicit_matmuls_count():
    """The CPU flash kernel's count equals torch's own count of the same attention as matmuls."""
    q = torch.randn(2, 6, 10, 8)
    kv = torch.randn(2, 2, 10, 8)
    with flop_counter() as fused:
        F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    k = kv.repeat_interleave(3, dim=1)  # grouped-query: each key/value head serves 3 query heads
    with flop_counter() as explicit:
        torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ k
    assert fused.get_total_flops() == explicit.get_total_flops() > 0
    assert sdpa_forward_flops(q.shape, kv.shape, kv.shape) == explicit.get_total_flops()


def test_matmuls_are_counted():
    with flop_counter() as counter:
        torch.nn.Linear(16, 4, bias=False)(torch.randn(3, 16))
    assert counter.get_total_flops() == 2 * 3 * 16 * 4


def test_flops_are_counted_on_training_forwards_only(monkeypatch):
    """Eval, no_grad and generate never open a FLOP counter or change the training FLOPs."""
    import dropbp
    import dropbp.flops
    from conftest import tiny_llama

    opened = []
    real = dropbp.flops.flop_counter
    monkeypatch.setattr(dropbp.flops, "flop_counter", lambda: opened.append(1) or real())
    model = tiny_llama(layers=2)
    handle = dropbp.apply(model)
    x = torch.zeros(2, 10, dtype=torch.long)
    model.train()
    model(x, labels=x).loss.backward()
    trained = handle.flops
    assert all(f is not None and f > 0 for f in trained) and len(opened) == 4
    model(x, labels=x).loss.backward()  # the same shape again: from the cache
    assert len(opened) == 4

    model.eval()
    model(x[:, :3])
    with torch.no_grad():
        model.train()
        model(x[:, :5])
    model.generate(x[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert len(opened) == 4 and handle.flops == trained


def test_a_branch_that_raises_closes_its_count():
    """A count left open by an error would leave a dispatch mode on for good."""
    import dropbp

    class Boom(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.branch = Boom()

        def forward(self, x):
            return x + self.branch(x)

    model = Model()
    dropbp.apply(model, branches=["branch"])
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.ones(2, requires_grad=True))
    assert not torch.utils._python_dispatch._get_current_dispatch_mode_stack()


def test_a_dropped_branch_that_views_its_input_is_counted():
    """A MoE router's ``hidden_states.view(-1, dim)`` under no_grad: a view that requires grad without a grad_fn.

    torch's per-module FLOP tracker registered gradient hooks on it and failed on the first training forward.
    """
    import dropbp

    class Router(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.gate(x.view(-1, 8)).view_as(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(8, 8)
            self.moe = Router()

        def forward(self, x):
            h = self.inp(x)
            return h + self.moe(h)

    model = Net()
    handle = dropbp.apply(model, branches=["moe"], auto_step=False)
    handle.set_mask([True])
    model(torch.randn(2, 3, 8)).sum().backward()
    assert handle.flops == [2 * 6 * 8 * 8]
    assert model.moe.gate.weight.grad is None and model.inp.weight.grad is not None
