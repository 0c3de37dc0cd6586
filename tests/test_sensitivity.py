"""Sensitivity: the fast exact recipe against the definition S_l = ||G - G_{-l}||^2."""

import pytest
import torch
from conftest import tiny_llama

import dropbp
from dropbp.reference import detach_branches
from dropbp.sensitivity import exact_sensitivity, score


def definition(model, batch, names, metric):
    """S_l from L + 1 full backward passes with the independent detach mechanism."""
    params = [p for p in model.parameters() if p.requires_grad]
    modules = [model.get_submodule(n) for n in names]

    def gradient(mask):
        with detach_branches(modules, mask):
            loss = model(batch, labels=batch).loss
        return [g if g is not None else torch.zeros_like(p)
                for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]

    full = gradient([False] * len(names))
    out = []
    for i in range(len(names)):
        mask = [j == i for j in range(len(names))]
        dropped = gradient(mask)
        out.append(score(full, [g - d for g, d in zip(full, dropped)], metric))
    return out


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("metric", ["grad_diff", "grad_norm_diff"])
def test_fast_equals_definition(tied, metric, batch):
    model = tiny_llama(layers=3, tie_word_embeddings=tied)
    model.train()
    names = [f"model.layers.{i}.{b}" for i in range(3) for b in ("self_attn", "mlp")]
    expected = definition(model, batch, names, metric)
    handle = dropbp.apply(model)
    fast = handle.sensitivity(lambda: model(batch, labels=batch).loss, metric=metric)
    naive = handle.sensitivity(lambda: model(batch, labels=batch).loss, metric=metric, method="naive")
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(expected), rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(torch.tensor(naive), torch.tensor(expected), rtol=1e-4, atol=1e-10)
    assert all(v > 0 for v in fast)


def test_partial_trainable_parameters(batch):
    """LoRA-like: only some parameters train; lower layers' grads still change when l is dropped."""
    model = tiny_llama(layers=3)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name or "down_proj" in name)
    names = [f"model.layers.{i}.{b}" for i in range(3) for b in ("self_attn", "mlp")]
    expected = definition(model, batch, names, "grad_diff")
    handle = dropbp.apply(model)
    fast = handle.sensitivity(lambda: model(batch, labels=batch).loss)
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(expected), rtol=1e-4, atol=1e-10)


def test_naive_replays_dropout(batch):
    model = tiny_llama(layers=2, attention_dropout=0.3)
    model.train()
    handle = dropbp.apply(model)
    closure = lambda: model(batch, labels=batch).loss  # noqa: E731
    torch.manual_seed(0)
    fast = handle.sensitivity(closure)
    torch.manual_seed(0)
    naive = handle.sensitivity(closure, method="naive")
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(naive), rtol=1e-4, atol=1e-10)


def test_bad_sensitivity_calls(llama, batch):
    handle = dropbp.apply(llama)
    llama.eval()
    with torch.no_grad(), pytest.raises(ValueError, match="scalar loss that requires grad"):
        handle.sensitivity(lambda: llama(batch, labels=batch).loss)
    llama.train()
    with pytest.raises(ValueError, match="method"):
        handle.sensitivity(lambda: llama(batch, labels=batch).loss, method="other")
    with pytest.raises(ValueError, match="metric"):
        handle.sensitivity(lambda: llama(batch, labels=batch).loss, metric="other")
    for p in llama.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        handle.sensitivity(lambda: llama(batch, labels=batch).loss)


def test_a_loss_that_reaches_none_of_the_parameters_is_refused(llama, batch):
    llama.train()
    loss = llama(batch, labels=batch).loss
    stranger = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="no gradient reaches the trainable parameters"):
        exact_sensitivity(loss, [[]], [stranger])


class TwiceCalled(torch.nn.Module):
    """One MLP branch applied twice (weight sharing), plus a second, ordinary branch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
        self.other = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        h = x + self.mlp(x)
        h = h + self.other(h)
        h = h + self.mlp(torch.sin(h))
        return self.head(h).pow(2).mean()


def test_a_branch_called_twice_is_measured_exactly():
    """Both calls are dropped together; 'fast' must equal the definition, not keep the last call."""
    model = TwiceCalled()
    handle = dropbp.apply(model, branches=["mlp", "other"])
    x = torch.randn(5, 8)
    naive = handle.sensitivity(lambda: model(x), method="naive")
    fast = handle.sensitivity(lambda: model(x), method="fast")
    assert fast == pytest.approx(naive, rel=1e-5)
    assert naive[0] > 0 and naive[1] > 0


def test_sensitivity_leaves_the_global_rng_where_it_was(llama, batch):
    llama.config.attention_dropout = 0.2
    handle = dropbp.apply(llama)
    llama.train()
    before = torch.get_rng_state()
    handle.sensitivity(lambda: llama(batch, labels=batch).loss)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("model_type", ["bloom", "mpt", "opt"])
def test_fast_equals_definition_on_span_branches(model_type, batch):
    """Spans (Bloom's and MPT's end before the residual add inside their module) against the definition."""
    from dropbp.tiny import tiny_causal_lm

    model = tiny_causal_lm(model_type)
    batch = batch % model.config.vocab_size
    handle = dropbp.apply(model)
    # The detach reference cuts each branch at its last module's output, as the paper's code would.
    names = [next(n for n, m in model.named_modules() if m is b.end_module) for b in handle.branches]
    handle.remove()
    expected = definition(model, batch, names, "grad_diff")
    handle = dropbp.apply(model)
    fast = handle.sensitivity(lambda: model(batch, labels=batch).loss)
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(expected), rtol=1e-4, atol=1e-10)
    assert all(v > 0 for v in fast)
