import pytest
import torch
import torch.nn.functional as F

from helpers import parameter_grads

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


# --- Mixture-of-Experts: the grouped GEMM of transformers' default experts kernel -------------------------------


def _per_group_reference(a, b, offs):
    """``torch._grouped_mm(a, b, offs)`` written as one torch.mm per group (torch counts those)."""
    ends = offs.tolist() if offs is not None else None
    starts = [0, *ends[:-1]] if ends is not None else None
    if a.dim() == 2 and b.dim() == 3:  # rows of a grouped
        return [a[s:e] @ b[i] for i, (s, e) in enumerate(zip(starts, ends))]
    if a.dim() == 3 and b.dim() == 2:  # columns of b grouped
        return [a[i] @ b[:, s:e] for i, (s, e) in enumerate(zip(starts, ends))]
    if a.dim() == 2 and b.dim() == 2:  # the contraction grouped
        return [a[:, s:e] @ b[s:e] for s, e in zip(starts, ends)]
    return [a[i] @ b[i] for i in range(a.shape[0])]  # 3D x 3D: batched


_G, _M, _K, _N = 3, 4, 8, 12  # the CPU kernel wants 16-byte strides: sizes that are multiples of 4 floats


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "ends"),
    [
        ((16, _K), (_G, _K, _N), [2, 5, 16]),  # 2D x 3D, the MoE forward
        ((16, _K), (_G, _K, _N), [2, 5, 9]),  # ... rows past offs[-1] are skipped (expert-parallel sentinels)
        ((_G, _M, _K), (_K, 16), [4, 8, 12]),  # 3D x 2D
        ((_M, 16), (16, _N), [4, 4, 16]),  # 2D x 2D, the MoE weight gradient (an empty group included)
        ((_G, _M, _K), (_G, _K, _N), None),  # 3D x 3D, batched
    ],
    ids=["2d3d", "2d3d-partial", "3d2d", "2d2d", "3d3d"],
)
def test_grouped_mm_counts_what_its_per_group_matmuls_count(a_shape, b_shape, ends):
    from dropbp.flops import grouped_mm_flops

    a, b = torch.randn(a_shape), torch.randn(b_shape)
    offs = torch.tensor(ends, dtype=torch.int32) if ends is not None else None
    with flop_counter() as grouped:
        out = torch._grouped_mm(a, b, offs=offs)
    with flop_counter() as reference:
        parts = _per_group_reference(a, b, offs)
    assert grouped.get_total_flops() == reference.get_total_flops() > 0
    assert grouped_mm_flops(a, b, offs) == reference.get_total_flops()
    assert grouped_mm_flops(a.shape, b.shape, offs) == reference.get_total_flops()
    # The semantics the formula assumes are the kernel's.
    if a.dim() == 2 and b.dim() == 3:
        expected = torch.cat(parts)[: ends[-1]]
        out = out[: ends[-1]]
    elif a.dim() == 3 and b.dim() == 2:
        expected = torch.cat(parts, dim=1)
        out = out[:, : ends[-1]]
    else:
        expected = torch.stack(parts)
    torch.testing.assert_close(out, expected)


def test_scaled_grouped_mm_counts_like_grouped_mm():
    """The FP8 variant (CUDA only) takes two scale tensors before ``offs``."""
    from dropbp.flops import grouped_mm_flops

    x, w = torch.randn(16, _K), torch.randn(_G, _K, _N)
    offs = torch.tensor([3, 7, 9], dtype=torch.int32)
    formula = flop_counter().flop_registry[torch.ops.aten._scaled_grouped_mm]
    scales = torch.ones(16), torch.ones(_G, _N)
    assert formula(x, w, *scales, offs, out_val=None) == grouped_mm_flops(x, w, offs) == 2 * 9 * _K * _N
    assert formula(x, w, *scales, offs=offs, out_val=None) == 2 * 9 * _K * _N


def test_grouped_mm_through_functional_and_transformers_fallback_are_counted():
    import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)

    from dropbp.flops import grouped_mm_flops

    x, w = torch.randn(16, _K), torch.randn(_G, _K, _N)
    offs = torch.tensor([3, 7, 16], dtype=torch.int32)
    expected = grouped_mm_flops(x, w, offs)
    assert expected == 2 * 16 * _K * _N
    with flop_counter() as functional:
        torch.nn.functional.grouped_mm(x, w, offs=offs)
    with flop_counter() as fallback:  # a custom op whose torch.mm loop runs below the dispatch mode
        torch.ops.transformers.grouped_mm_fallback(x, w, offs)
    assert functional.get_total_flops() == fallback.get_total_flops() == expected


def _train_flops(model, batch):
    import dropbp

    handle = dropbp.apply(model, drop_rate=0.5)
    model.train()
    model(batch, labels=batch).loss.backward()
    return handle.flops


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_branch_counts_what_eager_experts_count(model_type):
    """transformers' default experts kernel (grouped_mm) counts the same FLOPs as its per-expert eager loop.

    torch's counter did not know ``aten._grouped_mm``: a tiny Mixtral's MLP branch counted only its router.
    """
    from dropbp.tiny import tiny_causal_lm

    batch = torch.randint(0, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    grouped = tiny_causal_lm(model_type)
    assert grouped.config._experts_implementation == "grouped_mm"
    eager = tiny_causal_lm(model_type)
    eager.set_experts_implementation("eager")
    assert eager.config._experts_implementation == "eager"
    counted, reference = _train_flops(grouped, batch), _train_flops(eager, batch)
    assert counted == reference
    attention, mlp = reference[0], reference[1]
    assert mlp > attention / 4  # the experts' GEMMs are in it, not only the router


# --- FlexAttention: a higher-order op the counter did not run ----------------------------------------------------


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention with gradients on CPU, eagerly.

    On CPU torch refuses inputs that require grad (its compiled CPU kernel has no backward) and
    inductor cannot compile the training forward here, so the test runs the eager reference
    implementation, which the counted forward runs anyway (nothing compiles under a dispatch mode).
    """
    import torch.nn.attention.flex_attention as flex

    monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None)
    with torch.compiler.set_stance("force_eager"):
        yield


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.filterwarnings("ignore:_compile flag on create_block_mask")
def test_flex_attention_trains_with_dropbp_and_is_counted_like_sdpa(eager_flex):
    """The first training forward failed in the counter: "no implementation found for
    'torch.ops.higher_order.flex_attention'". At drop rate 0 the gradients are the plain model's."""
    import dropbp
    from conftest import tiny_llama

    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    plain = tiny_llama(layers=2, attn_implementation="flex_attention")
    plain.train()
    plain(x, labels=x).loss.backward()

    model = tiny_llama(layers=2, attn_implementation="flex_attention")
    assert model.config._attn_implementation == "flex_attention"
    handle = dropbp.apply(model, drop_rate=0.0)
    model.train()
    model(x, labels=x).loss.backward()
    expected = parameter_grads(plain, present_only=True)
    got = parameter_grads(model, present_only=True)
    assert got.keys() == expected.keys() and len(got) == len(list(model.parameters()))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)

    sdpa = tiny_llama(layers=2, attn_implementation="sdpa")
    assert handle.flops == _train_flops(sdpa, x)

    dropped = tiny_llama(layers=2, attn_implementation="flex_attention")
    dropped_handle = dropbp.apply(dropped, drop_rate=0.5)
    dropped.train()
    for _ in range(2):
        dropped(x, labels=x).loss.backward()
    assert dropped_handle.flops == handle.flops


def test_flex_attention_op_is_counted_by_formula_and_runs():
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(2, 4, 16, 8)
    kv = torch.randn(2, 2, 16, 8)
    with flop_counter() as counter:  # no stance set here: the counter runs compiled functions eagerly itself
        out = flex_attention(q, kv, kv, enable_gqa=True)
    reference = F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    torch.testing.assert_close(out, reference)
    assert counter.get_total_flops() == sdpa_forward_flops(q.shape, kv.shape, kv.shape)


def test_a_fullgraph_compiled_function_runs_eagerly_in_a_count_and_the_stance_is_restored():
    """Under a dispatch mode Dynamo compiles nothing; fullgraph=True then raised after the call had run."""
    from torch._dynamo import eval_frame

    square = torch.compile(lambda x: x @ x, fullgraph=True, backend="eager")
    with flop_counter() as outer:
        assert eval_frame._stance.stance == "force_eager"
        with flop_counter() as inner:
            square(torch.randn(4, 4))
        assert eval_frame._stance.stance == "force_eager"  # the outer count is still open
    assert inner.get_total_flops() == outer.get_total_flops() == 2 * 4 * 4 * 4
    assert eval_frame._stance.stance == "default"
    with pytest.raises(RuntimeError, match="boom"), flop_counter():
        raise RuntimeError("boom")
    assert eval_frame._stance.stance == "default"
    assert not torch.utils._python_dispatch._get_current_dispatch_mode_stack()


def test_a_higher_order_op_the_counter_cannot_handle_runs_with_one_warning(monkeypatch):
    """torch's own mode returned NotImplemented for it, and the caller got NotImplemented as the result."""
    import dropbp.flops
    from dropbp.flops import DropBPFlopWarning

    invoke_subgraph = pytest.importorskip("torch._higher_order_ops.invoke_subgraph").invoke_subgraph
    monkeypatch.setattr(dropbp.flops, "_warned_ops", set())
    linear = torch.nn.Linear(8, 8, bias=False)
    x = torch.randn(3, 8)
    with pytest.warns(DropBPFlopWarning, match="invoke_subgraph.*uncounted") as record:
        with flop_counter():
            for _ in range(2):
                (out,) = invoke_subgraph(lambda t: (linear(t),), "dropbp", x)
    assert len([w for w in record if issubclass(w.category, DropBPFlopWarning)]) == 1
    torch.testing.assert_close(out, linear(x))


def test_a_failing_formula_counts_zero_with_a_warning_instead_of_failing_the_op(monkeypatch):
    import dropbp.flops
    from dropbp.flops import DropBPFlopWarning

    monkeypatch.setattr(dropbp.flops, "_warned_ops", set())

    def broken(*args, **kwargs):
        raise AssertionError("shapes this formula did not expect")

    monkeypatch.setattr(dropbp.flops, "_extra_ops", lambda: {torch.ops.aten.mm: broken})
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    with pytest.warns(DropBPFlopWarning, match="aten.mm.*failed"):
        with flop_counter() as counter:
            out = a @ b
    assert counter.get_total_flops() == 0
    torch.testing.assert_close(out, a.mm(b))


# --- The plausibility guard: an uncounted kernel must not pass silently ------------------------------------------


def test_implausible_flops():
    from dropbp.flops import implausible_flops

    assert not implausible_flops(2 * 100 * 10, params=100, tokens=10)  # dense
    assert not implausible_flops(2 * 100 * 10 * 8 // 128, params=100, tokens=10)  # top-8 of 128 experts
    assert implausible_flops(2 * 100 * 10 // 200, params=100, tokens=10)  # a 200x undercount
    assert implausible_flops(0, params=100, tokens=10)
    assert not implausible_flops(0, params=0, tokens=10) and not implausible_flops(0, params=100, tokens=0)


class _UncountedLinear(torch.nn.Module):
    """A linear layer computed by broadcast-multiply and sum: ops torch's FLOP counter does not count."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x):
        return (x.unsqueeze(-1) * self.weight).sum(-2)


def test_meter_warns_once_per_branch_whose_kernel_is_not_counted():
    from dropbp.flops import DropBPFlopWarning, FlopMeter

    branches = [torch.nn.Linear(16, 16), _UncountedLinear(16)]
    params = [sum(p.numel() for p in b.parameters()) for b in branches]
    meter = FlopMeter(2, param_counts=params, names=["layers.0.dense", "layers.0.fused"])
    with pytest.warns(DropBPFlopWarning) as record:
        for seq in (3, 5, 7):  # a new shape each time: a new count each time
            x = torch.randn(2, seq, 16)
            for index, branch in enumerate(branches):
                count = meter.start(index, (x,), {})
                branch(x)
                meter.stop(index, count, completed=True)
    ours = [w for w in record if issubclass(w.category, DropBPFlopWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "'layers.0.fused'" in message and "flop_counter" in message and "backward_flops_skipped" in message
    assert f"{2 * 256 * 6:,}" in message  # the expected figure at the first shape (6 tokens)
    assert meter.flops == [2 * 2 * 7 * 16 * 16, 0]


def test_meter_without_parameter_counts_does_not_check():
    import warnings

    from dropbp.flops import FlopMeter

    meter = FlopMeter(1)  # what callers that pass no parameter counts get
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        count = meter.start(0, (torch.randn(2, 3, 8),), {})
        _UncountedLinear(8)(torch.randn(2, 3, 8))
        meter.stop(0, count, completed=True)
    assert meter.flops == [0]


def _many_experts_qwen3_moe():
    from transformers import AutoConfig, AutoModelForCausalLM

    from dropbp.tiny import shrink_config

    config = shrink_config(AutoConfig.for_model("qwen3_moe"))
    config.num_experts, config.num_experts_per_tok = 128, 8  # Qwen3-MoE's routing: ~6% of the experts per token
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _lora_llama():
    peft = pytest.importorskip("peft")
    from conftest import tiny_llama

    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    return peft.get_peft_model(tiny_llama(layers=2), config)


@pytest.mark.parametrize("build", ["llama", "lora", "mixtral", "qwen3_moe_128_experts"])
def test_plausibility_guard_does_not_fire_on_counted_branches(build):
    """Dense, LoRA and MoE branches at tiny shapes (one sequence of 1 to 4 tokens) stay quiet."""
    import warnings

    import dropbp
    from conftest import tiny_llama
    from dropbp.flops import DropBPFlopWarning, implausible_flops
    from dropbp.tiny import tiny_causal_lm

    model = {
        "llama": lambda: tiny_llama(layers=2),
        "lora": _lora_llama,
        "mixtral": lambda: tiny_causal_lm("mixtral"),
        "qwen3_moe_128_experts": _many_experts_qwen3_moe,
    }[build]()
    handle = dropbp.apply(model, drop_rate=0.5)
    params = [sum(p.numel() for p in branch.parameters()) for branch in handle.branches]
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropBPFlopWarning)
        for seq in (1, 2, 4):
            x = torch.randint(0, 60, (1, seq))
            model(x, labels=x).loss.backward()
            assert not any(implausible_flops(f, p, seq) for f, p in zip(handle.flops, params))
    if build == "qwen3_moe_128_experts":
        share = handle.flops[1] / (2 * params[1] * 4)
        assert 0.01 < share < 0.2  # top-8 of 128: the guard's margin on the sparsest common routing


def test_plausibility_guard_catches_uncounted_moe_experts(monkeypatch):
    """Without the grouped-GEMM formula (the undercount this guard is for) each MLP branch warns once."""
    import dropbp
    import dropbp.flops
    from dropbp.flops import DropBPFlopWarning
    from dropbp.tiny import tiny_causal_lm

    monkeypatch.setattr(dropbp.flops, "_extra_ops", dict)  # torch's registry only
    model = tiny_causal_lm("mixtral")
    handle = dropbp.apply(model, drop_rate=0.5)
    model.train()
    with pytest.warns(DropBPFlopWarning) as record:
        for seq in (4, 6):
            x = torch.randint(0, 200, (2, seq))
            model(x, labels=x).loss.backward()
    ours = [str(w.message) for w in record if issubclass(w.category, DropBPFlopWarning)]
    mlps = [b.name for b in handle.branches if "mlp" in b.name]
    assert len(ours) == len(mlps) == 2
    assert all(any(f"'{name}'" in message for message in ours) for name in mlps)
