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
    with torch.no_grad(), pytest.raises(ValueError, match="ran no training forward"):
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


@pytest.mark.parametrize("model_type", ["bloom", "mpt", "opt", "falcon"])
def test_fast_equals_definition_on_span_branches(model_type, batch):
    """Spans (Bloom's and MPT's end before the residual add inside their module) against the definition.
    Falcon adds the attention output into the MLP's output in place (`mlp_output += attention_output`):
    measured on that tensor, the MLP's partial backward ran through the attention too."""
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


class Block(torch.nn.Module):
    """A pre-norm layer with an attention-like and an MLP branch; can also read a second stream."""

    def __init__(self, width=8):
        super().__init__()
        self.mix = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.Tanh(), torch.nn.Linear(16, width))

    def forward(self, x, extra=None, shared=None):
        a = torch.tanh(x) if extra is None else torch.tanh(x) + extra
        h = x + self.mix(a if shared is None else a * shared)
        return h + self.mlp(torch.sin(h))


class Stack(torch.nn.Module):
    """Blocks in a ModuleList. ``value_residual``: every block also reads the first block's output
    (a path that skips the block inputs); ``shared``: a trainable parameter outside the blocks that
    every block uses; ``scale_between``: a trainable scale between the blocks."""

    def __init__(self, layers=4, value_residual=False, shared=False, scale_between=False, side=1.0):
        super().__init__()
        self.side = side  # the weight of the value-residual path
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(8, 8)
        self.layers = torch.nn.ModuleList(Block() for _ in range(layers))
        self.scale = torch.nn.Parameter(torch.full((8,), 1.1)) if scale_between else None
        self.shared = torch.nn.Parameter(torch.full((8,), 0.9)) if shared else None
        self.head = torch.nn.Linear(8, 1)
        self.value_residual = value_residual

    def forward(self, x):
        h = self.embed(x)
        first = None
        for layer in self.layers:
            h = layer(h, first * self.side if self.value_residual and first is not None else None, self.shared)
            first = h if first is None else first
            if self.scale is not None:
                h = h * self.scale
        return self.head(h).pow(2).mean()


def _llama_fast_and_definition(batch, metric, tied=False):
    """A 3-layer tiny Llama's fast sensitivities and the definition's, on the same batch."""
    model = tiny_llama(layers=3, tie_word_embeddings=tied)
    model.train()
    names = [f"model.layers.{i}.{b}" for i in range(3) for b in ("self_attn", "mlp")]
    expected = definition(model, batch, names, metric)
    handle = dropbp.apply(model)
    return handle.sensitivity(lambda: model(batch, labels=batch).loss, metric=metric), expected


def _spy_on_batched(monkeypatch):
    """Record what each call of the batched path returned (None = it fell back)."""
    from dropbp import sensitivity

    returned = []
    original = sensitivity._batched_down_the_blocks

    def spy(*args, **kwargs):
        returned.append(original(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(sensitivity, "_batched_down_the_blocks", spy)
    return returned


@pytest.mark.parametrize("metric", ["grad_diff", "grad_norm_diff"])
@pytest.mark.parametrize("tiny_batches", [False, True])
def test_llama_is_measured_batched_down_its_layers(metric, tiny_batches, batch, monkeypatch):
    """The batched path runs (and equals the definition), also when every row is its own backward."""
    from dropbp import sensitivity

    if tiny_batches:
        monkeypatch.setattr(sensitivity, "BATCH_BYTES", 1)
    returned = _spy_on_batched(monkeypatch)
    fast, expected = _llama_fast_and_definition(batch, metric, tied=True)
    assert len(returned) == 1 and returned[0] is not None
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(expected), rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("structure, batched_calls", [
    ("value_residual", [None]), ("shared", [None]), ("scale_between", []),
])
def test_blocks_that_do_not_carry_every_path_fall_back_to_branch_by_branch(structure, batched_calls, monkeypatch):
    """A path around the block inputs or a trainable parameter outside the blocks that they use: the
    sum check sees it (None). A block called with something other than the previous block's
    output: the batched path is not tried ([]). Either way the branches are measured one by one,
    exactly."""
    returned = _spy_on_batched(monkeypatch)
    model = Stack(**{structure: True})
    handle = dropbp.apply(model, branches=["layers.*.mix", "layers.*.mlp"])
    x = torch.randn(5, 8)
    naive = handle.sensitivity(lambda: model(x), method="naive")
    fast = handle.sensitivity(lambda: model(x))
    assert returned == batched_calls
    assert fast == pytest.approx(naive, rel=1e-5)
    assert all(v > 0 for v in naive)


def test_plain_stack_is_measured_batched(monkeypatch):
    """The same stack without the extra paths takes the batched path and equals the definition."""
    returned = _spy_on_batched(monkeypatch)
    model = Stack()
    handle = dropbp.apply(model, branches=["layers.*.mix", "layers.*.mlp"])
    x = torch.randn(5, 8)
    naive = handle.sensitivity(lambda: model(x), method="naive")
    fast = handle.sensitivity(lambda: model(x))
    assert len(returned) == 1 and returned[0] is not None
    assert fast == pytest.approx(naive, rel=1e-5)


def test_rows_too_wide_to_gain_from_batching_are_measured_one_by_one(batch, monkeypatch):
    from dropbp import sensitivity

    monkeypatch.setattr(sensitivity, "STREAM_BYTES", 1)
    returned = _spy_on_batched(monkeypatch)
    fast, expected = _llama_fast_and_definition(batch, "grad_diff")
    assert returned == [None]
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(expected), rtol=1e-4, atol=1e-10)


def test_an_moe_router_auxiliary_loss_is_refused_by_the_fast_measurement(batch):
    """The router logits feed the auxiliary loss through hooks inside the MoE branch, a path the partial
    backward from the branch output misses: refused with one line, not measured wrong."""
    import transformers as T

    from dropbp.errors import DropBPError
    from dropbp.tiny import tiny_causal_lm

    config = T.AutoConfig.for_model("mixtral", output_router_logits=True, router_aux_loss_coef=0.5)
    model = tiny_causal_lm(config)
    batch = batch % model.config.vocab_size
    handle = dropbp.apply(model)
    closure = lambda: model(batch, labels=batch).loss  # noqa: E731
    with pytest.raises(DropBPError, match="misses the MoE router's auxiliary loss") as error:
        handle.sensitivity(closure)
    assert "\n" not in str(error.value)
    assert len(handle.sensitivity(closure, method="naive")) == len(handle.branches)
    handle.remove()
    model.config.output_router_logits = False  # the language-model loss alone: measured exactly
    assert dropbp.check(model).ok


def test_a_small_path_around_the_blocks_is_not_let_through_by_the_sum_check(monkeypatch):
    """A value residual carrying 3e-4 of the stream: the batched rows missed it by 1.4e-4 (relative), which a
    1e-3 tolerance let through. The check now holds the rows to float32 rounding and falls back."""
    returned = _spy_on_batched(monkeypatch)
    model = Stack(value_residual=True, side=3e-4)
    handle = dropbp.apply(model, branches=["layers.*.mix", "layers.*.mlp"])
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    naive = handle.sensitivity(lambda: model(x), method="naive")
    fast = handle.sensitivity(lambda: model(x))
    assert returned == [None]
    assert fast == pytest.approx(naive, rel=2e-6)


def test_half_precision_is_measured_one_by_one(monkeypatch):
    """bfloat16 rounding exceeds what the sum check must catch: no batched path, and still the definition."""
    returned = _spy_on_batched(monkeypatch)
    model = Stack().to(torch.bfloat16)
    handle = dropbp.apply(model, branches=["layers.*.mix", "layers.*.mlp"])
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    fast = handle.sensitivity(lambda: model(x).float())
    assert returned == [None]
    assert all(v > 0 for v in fast)


def _two_batches():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (2, 10), generator=generator) for _ in range(2)]


def test_every_training_forward_of_the_closure_is_measured(batch):
    """R-Drop, consistency losses, separate chosen/rejected forwards: the loss sums two forwards. Only the
    first used to be measured ([0.379, 0.0145, ...] where the definition gives [1.038, 0.0361, ...])."""
    model = tiny_llama(layers=2)
    model.train()
    handle = dropbp.apply(model)
    a, b = _two_batches()
    closure = lambda: model(a, labels=a).loss + model(b, labels=b).loss  # noqa: E731
    naive = handle.sensitivity(closure, method="naive")
    fast = handle.sensitivity(closure)
    first_only = handle.sensitivity(lambda: model(a, labels=a).loss)
    assert fast == pytest.approx(naive, rel=1e-4)
    assert fast != pytest.approx(first_only, rel=1e-2)


def test_a_forward_that_feeds_the_next_one_is_measured_exactly():
    """The second forward reads the first one's output: one partial backward per branch would count the path
    through both calls twice, so such a branch is measured with it dropped."""
    model = tiny_llama(layers=2)
    model.train()
    handle = dropbp.apply(model)
    a, _ = _two_batches()

    def closure():
        hidden = model.model(input_ids=a).last_hidden_state
        return model(inputs_embeds=hidden, labels=a).loss

    naive = handle.sensitivity(closure, method="naive")
    fast = handle.sensitivity(closure)
    assert fast == pytest.approx(naive, rel=1e-4)
    assert all(v > 0 for v in naive)


class DictBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return {"hidden": self.linear(torch.tanh(x)), "gate": torch.sigmoid(self.linear.weight.sum())}


class DictStack(torch.nn.Module):
    """Branches that return a dict (the residual contribution and a second tensor the loss also uses)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"branch": DictBranch()}) for _ in range(3))
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        gates = 0.0
        for layer in self.layers:
            out = layer["branch"](x)
            x = x + out["hidden"]
            gates = gates + out["gate"]
        return self.head(x).pow(2).mean() + gates


def test_a_branch_that_returns_a_dict_is_measured():
    """It used to measure 0 (the naive definition gives 12.09 on the issue's model), then got the maximum rate."""
    model = DictStack()
    handle = dropbp.apply(model, branches=["layers.*.branch"])
    x = torch.randn(4, 8)
    naive = handle.sensitivity(lambda: model(x), method="naive")
    fast = handle.sensitivity(lambda: model(x))
    assert all(v > 0 for v in naive)
    assert fast == pytest.approx(naive, rel=1e-5)


def test_attention_weights_returned_beside_the_output_are_not_counted_twice():
    """MPT's attention returns its weights, which its output is computed from: measured at the returned
    tensors themselves, the path through the weights would count twice."""
    from dropbp.tiny import example_batch, tiny_causal_lm

    model = tiny_causal_lm("mpt")
    model.train()
    batch = example_batch(model)
    handle = dropbp.apply(model)
    naive = handle.sensitivity(lambda: model(**batch).loss, method="naive")
    fast = handle.sensitivity(lambda: model(**batch).loss)
    assert fast == pytest.approx(naive, rel=1e-5)


@pytest.mark.parametrize("where", ["model", "decoder layers"])
def test_eval_mode_is_refused_not_measured_as_zeros(where, batch):
    """All zeros would be allocated as uniform rates without a word."""
    from dropbp.errors import DropBPError

    model = tiny_llama(layers=2)
    model.train()
    handle = dropbp.apply(model)
    if where == "model":
        model.eval()
        expected, message = ValueError, "ran no training forward of the model"
    else:
        model.model.layers.eval()
        expected, message = DropBPError, "is in eval mode inside a training forward"
    for method in ("fast", "naive"):
        with pytest.raises(expected, match=message) as info:
            handle.sensitivity(lambda: model(batch, labels=batch).loss, method=method)
        assert "\n" not in str(info.value)


class SkipsALayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"mlp": torch.nn.Linear(8, 8)}) for _ in range(3))

    def forward(self, x):
        for layer in self.layers[:2]:  # the last layer is never called
            x = x + layer["mlp"](x)
        return x.pow(2).mean()


def test_a_branch_the_forward_never_calls_is_named():
    model = SkipsALayer()
    handle = dropbp.apply(model, branches=["layers.*.mlp"], drop_rate=0.5)
    x = torch.randn(4, 8)
    for _ in range(8):
        model(x).backward()
    with pytest.raises(ValueError, match="branch 'layers.2.mlp' never ran in the training forwards") as info:
        handle.calibrate([lambda: model(x)], target=0.5)
    assert "\n" not in str(info.value)
    statistics = handle.drop_statistics()
    expected = sum(sum(dropbp.sample_mask(0, step, [0.5] * 3)[:2]) for step in range(8)) / 16
    assert statistics["drop_rate"] == pytest.approx(expected)
    assert statistics["backward_flops_skipped"] == pytest.approx(expected)
