"""The no-grad branch mechanism, the handle's mask stream, persistence and removal."""

import inspect

import pytest
import torch
from conftest import tiny_llama
from helpers import parameter_grads

import dropbp
from dropbp.memory import ActivationMeter
from dropbp.reference import detach_branches


def train_step_grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(batch, labels=batch).loss.backward()
    return parameter_grads(model)


MASK = [True, False, False, True, True, False]


def test_fixed_mask_matches_detach_reference(batch):
    reference = tiny_llama()
    reference.train()
    names = [f"model.layers.{i}.{b}" for i in range(3) for b in ("self_attn", "mlp")]
    modules = [reference.get_submodule(n) for n in names]
    with detach_branches(modules, MASK):
        expected = train_step_grads(reference, batch)

    model = tiny_llama()
    model.train()
    handle = dropbp.apply(model, auto_step=False)
    assert [b.name for b in handle.branches] == names
    handle.set_mask(MASK)
    got = train_step_grads(model, batch)
    assert expected.keys() == got.keys()
    for name in expected:
        if expected[name] is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    for branch, dropped in zip(handle.branches, MASK):
        if dropped:
            assert all(p.grad is None for p in branch.module.parameters()), branch.name
        else:
            assert all(p.grad is not None for p in branch.module.parameters()), branch.name


def test_zero_rate_gradients_are_bitwise_equal(batch):
    plain, hooked = tiny_llama(), tiny_llama()
    plain.train(), hooked.train()
    dropbp.apply(hooked, drop_rate=0.0)
    expected, got = train_step_grads(plain, batch), train_step_grads(hooked, batch)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_eval_and_no_grad_are_bitwise_unchanged(batch):
    plain, hooked = tiny_llama(), tiny_llama()
    handle = dropbp.apply(hooked, drop_rate=0.9)
    plain.eval(), hooked.eval()
    assert torch.equal(plain(batch).logits, hooked(batch).logits)
    plain.train(), hooked.train()
    with torch.no_grad():
        assert torch.equal(plain(batch).logits, hooked(batch).logits)
    assert handle.step_count == 0


def test_training_output_is_exact_while_dropping(batch):
    plain, hooked = tiny_llama(), tiny_llama()
    plain.train(), hooked.train()
    dropbp.apply(hooked, drop_rate=0.5)
    assert torch.equal(plain(batch, labels=batch).loss, hooked(batch, labels=batch).loss)


def test_auto_step_advances_only_on_training_forwards(llama, batch):
    handle = dropbp.apply(llama, drop_rate=0.5, seed=3)
    llama.train()
    llama(batch)
    llama(batch)
    assert handle.step_count == 2
    assert handle.mask == dropbp.sample_mask(3, 1, handle.drop_rates)
    llama.eval()
    llama(batch)
    llama.train()
    with torch.no_grad():
        llama(batch)
    assert handle.step_count == 2


def test_manual_step_and_set_mask(llama, batch):
    handle = dropbp.apply(llama, drop_rate=0.5, auto_step=False)
    llama.train()
    llama(batch)
    assert handle.step_count == 0 and handle.mask == [False] * 6
    assert handle.step() == dropbp.sample_mask(0, 0, [0.5] * 6)
    handle.set_mask([True] * 6)
    assert handle.mask == [True] * 6 and handle.step_count == 1


def train_masks(model, handle, batch, steps):
    """The mask of each of ``steps`` training steps (auto_step draws them)."""
    masks = []
    for _ in range(steps):
        model(batch, labels=batch).loss.backward()
        masks.append(handle.mask)
    return masks


def test_masks_resume_from_state_dict(batch):
    def run(model, handle, steps):
        return train_masks(model, handle, batch, steps)

    model = tiny_llama()
    model.train()
    handle = dropbp.apply(model, drop_rate=0.4, seed=5)
    handle.set_drop_rates([0.1, 0.8, 0.3, 0.6, 0.2, 0.4])
    uninterrupted = run(model, handle, 10)

    first = tiny_llama()
    first.train()
    handle1 = dropbp.apply(first, drop_rate=0.4, seed=5)
    handle1.set_drop_rates([0.1, 0.8, 0.3, 0.6, 0.2, 0.4])
    before = run(first, handle1, 4)
    state = handle1.state_dict()

    resumed = tiny_llama()
    resumed.train()
    handle2 = dropbp.apply(resumed, drop_rate=0.0, seed=99)
    handle2.load_state_dict(state)
    assert handle2.drop_rates == handle1.drop_rates and handle2.seed == 5
    assert before + run(resumed, handle2, 6) == uninterrupted


def test_structured_masks_give_kept_branches_their_exact_gradients(batch):
    """Below the cut everything is dropped, above it nothing: each kept branch's gradient is the full backward's."""
    full = tiny_llama().train()
    expected = train_step_grads(full, batch)
    model = tiny_llama().train()
    handle = dropbp.apply(model, drop_rate=0.5, seed=1, mask="structured", auto_step=False)
    seen = set()
    for step in range(12):
        mask = handle.step()
        assert mask == sorted(mask, reverse=True)  # a lowest prefix is dropped
        seen.add(sum(mask))
        got = train_step_grads(model, batch)
        for branch, dropped in zip(handle.branches, mask):
            for name, p in branch.module.named_parameters(prefix=branch.name):
                if dropped:
                    assert got[name] is None, name
                else:
                    torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
        # The layers above every branch (final norm, head) always get the full gradient too.
        torch.testing.assert_close(got["lm_head.weight"], expected["lm_head.weight"], rtol=1e-5, atol=1e-7)
    assert len(seen) > 2  # the cut moves


def test_structured_masks_resume_exactly_and_refuse_a_different_mode(batch):
    def masks(handle, model, steps):
        return train_masks(model, handle, batch, steps)

    model = tiny_llama().train()
    handle = dropbp.apply(model, drop_rate=0.5, seed=2, mask="structured", schedule="linear:0.75:0", total_steps=10)
    uninterrupted = masks(handle, model, 10)
    first = tiny_llama().train()
    handle1 = dropbp.apply(first, drop_rate=0.5, seed=2, mask="structured", schedule="linear:0.75:0", total_steps=10)
    before, state = masks(handle1, first, 4), handle1.state_dict()
    resumed = tiny_llama().train()
    handle2 = dropbp.apply(resumed, drop_rate=0.5, mask="structured", schedule="linear:0.75:0", total_steps=10)
    handle2.load_state_dict(state)
    assert before + masks(handle2, resumed, 6) == uninterrupted
    assert state["mask_mode"] == "structured"
    random = dropbp.apply(tiny_llama(), drop_rate=0.5, schedule="linear:0.75:0", total_steps=10)
    with pytest.raises(ValueError, match="saved with mask='structured', this handle draws mask='random'"):
        random.load_state_dict(state)
    with pytest.raises(ValueError, match="per-branch rates do not apply"):
        handle.allocate(0.5, [1.0] * 6)
    with pytest.raises(ValueError, match="pass sensitivity_at=None"):
        dropbp.DropBPConfig(mask="structured", sensitivity_at=0.1)
    with pytest.raises(ValueError, match="mask must be 'random' or 'structured', got 'lowest'"):
        dropbp.DropBPConfig(mask="lowest")


def test_module_tree_keys_signature_and_remove(tmp_path, batch):
    model = tiny_llama()
    keys = list(model.state_dict().keys())
    modules = [n for n, _ in model.named_modules()]
    signature = inspect.signature(model.forward)
    model.save_pretrained(tmp_path / "plain")

    handle = dropbp.apply(model, drop_rate=0.5)
    assert list(model.state_dict().keys()) == keys
    assert [n for n, _ in model.named_modules()] == modules
    assert inspect.signature(model.forward) == signature
    model.save_pretrained(tmp_path / "hooked")
    for f in (tmp_path / "plain").iterdir():
        assert f.read_bytes() == (tmp_path / "hooked" / f.name).read_bytes(), f.name

    handle.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert dropbp.find_handle(model) is None
    model.train()
    reference = tiny_llama()
    reference.train()
    model.zero_grad()
    assert torch.equal(model(batch, labels=batch).loss, reference(batch, labels=batch).loss)
    dropbp.apply(model)  # applying again after remove() is allowed


def test_dropped_branches_save_no_activations(batch):
    def saved_bytes(model):
        with ActivationMeter(model.parameters()) as meter:
            loss = model(batch, labels=batch).loss
        held = meter.held_bytes
        loss.backward()
        return held

    model = tiny_llama(layers=4)
    model.train()
    handle = dropbp.apply(model, auto_step=False)
    handle.set_mask([False] * 8)
    none = saved_bytes(model)
    handle.set_mask([True, True, False, False, True, True, False, False])
    half = saved_bytes(model)
    handle.set_mask([True] * 8)
    every = saved_bytes(model)
    assert every < half < none
    # The branches hold most of a block's activations: half the branches, well under 3/4 of the bytes.
    assert half - every < 0.75 * (none - every)


def test_every_branch_dropped_with_only_branch_parameters_trainable(llama, batch):
    for name, p in llama.named_parameters():
        p.requires_grad_(".self_attn." in name or ".mlp." in name)
    handle = dropbp.apply(llama, auto_step=False)
    llama.train()
    handle.set_mask([True] * 6)
    loss = llama(batch, labels=batch).loss
    loss.backward()  # must not raise "does not require grad"
    assert all(p.grad is None for p in llama.parameters())
    handle.set_mask([False] * 6)
    llama(batch, labels=batch).loss.backward()
    assert all(p.grad is not None for p in llama.parameters() if p.requires_grad)


def test_branch_records_and_flops():
    model = tiny_llama(layers=2)
    handle = dropbp.apply(model, drop_rate=0.25)
    assert all(b.flops is None for b in handle.branches)
    batch, seq = 3, 10
    model(torch.zeros(batch, seq, dtype=torch.long))
    cfg = model.config
    d, heads, kv, head_dim, inter = 32, 4, 2, 8, 64
    tokens = batch * seq
    attn = 2 * tokens * (d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d)
    attn += 4 * batch * heads * seq * seq * head_dim
    mlp = 2 * tokens * 3 * d * inter
    assert cfg.num_key_value_heads == kv
    assert handle.flops == [attn, mlp, attn, mlp]
    assert [b.drop_rate for b in handle.branches] == [0.25] * 4
    assert handle.branches[1].module is model.model.layers[0].mlp
    assert handle.dropped_flops_fraction([True, False, True, False]) == pytest.approx(attn / (attn + mlp))
    model(torch.zeros(batch, 2 * seq, dtype=torch.long))
    assert handle.flops[1] == 2 * mlp  # recounted at the new shape
    model(torch.zeros(batch, seq, dtype=torch.long))
    assert handle.flops == [attn, mlp, attn, mlp]  # a shape seen before comes from the cache


def test_sensitivity_leaves_grads_masks_and_rng_alone(llama, batch):
    handle = dropbp.apply(llama, drop_rate=0.5, seed=1)
    llama.train()
    llama(batch, labels=batch).loss.backward()
    before = parameter_grads(llama)
    mask, step = handle.mask, handle.step_count
    values = handle.sensitivity(lambda: llama(batch, labels=batch).loss)
    assert len(values) == 6 and all(v > 0 for v in values)
    assert handle.mask == mask and handle.step_count == step
    after = parameter_grads(llama)
    assert all(torch.equal(before[n], after[n]) for n in before if before[n] is not None)
    assert handle.sensitivities == values


def test_allocate_sets_rates(llama, batch):
    handle = dropbp.apply(llama)
    llama.train()
    values = handle.sensitivity(lambda: llama(batch, labels=batch).loss)
    rates = handle.allocate(0.5)
    assert rates == handle.drop_rates == dropbp.allocate_drop_rates(values, handle.flops, 0.5)
    assert handle.dropped_flops_fraction() == pytest.approx(0.5)


class TwoBlock(torch.nn.Module):
    """A plain module (no Hugging Face config) with its own branch names."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"attn": torch.nn.Linear(8, 8), "ff": torch.nn.Linear(8, 8)}) for _ in range(2)
        )

    def forward(self, x):
        for block in self.blocks:
            x = x + block["attn"](x)
            x = x + block["ff"](x)
        return x.pow(2).mean()


def test_plain_module_with_branch_patterns():
    model = TwoBlock()
    handle = dropbp.apply(model, branches=["blocks.*.attn", "blocks.*.ff"], auto_step=False)
    assert [b.name for b in handle.branches] == ["blocks.0.attn", "blocks.0.ff", "blocks.1.attn", "blocks.1.ff"]
    handle.set_mask([False, True, False, False])
    model(torch.randn(4, 8)).backward()
    assert model.blocks[0]["ff"].weight.grad is None
    assert model.blocks[1]["ff"].weight.grad is not None


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: dropbp.apply(m, drop_rate=1.0), r"drop_rate must be in \[0, 1\)"),
        (lambda m: dropbp.apply(m, drop_rate=-0.1), r"drop_rate must be in \[0, 1\)"),
        (lambda m: dropbp.apply(m, drop_rate=float("nan")), r"drop_rate must be in \[0, 1\)"),
        (lambda m: dropbp.apply(m, branches=["*.nothing"]), "match no module"),
        (lambda m: dropbp.apply(m, branches=["*.layers.*.mlp", "*.layers.*.mlp.up_proj"]), "nested inside"),
        (lambda m: dropbp.apply(m, branches=["*.layers.*"]), "whole decoder layer"),
        (lambda m: dropbp.apply(m, branches=[]), "empty"),
        (lambda m: dropbp.apply(m, seed=1.5), "seed must be an integer, got 1.5"),
        (lambda m: dropbp.apply(m, seed=True), "seed must be an integer"),
    ],
)
def test_bad_apply_arguments(llama, call, message):
    with pytest.raises(ValueError, match=message):
        call(llama)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in llama.modules())


def test_apply_takes_a_config_and_keywords_override_its_fields(batch):
    config = dropbp.DropBPConfig(drop_rate=0.25, seed=7, auto_step=False, drop_schedule="linear:0.25:0")
    from_config = dropbp.apply(tiny_llama(), config, total_steps=10)
    from_keywords = dropbp.apply(tiny_llama(), drop_rate=0.25, seed=7, auto_step=False, schedule="linear:0.25:0",
                                 total_steps=10)
    for handle in (from_config, from_keywords):
        assert (handle.seed, handle.auto_step, handle.drop_rates[0]) == (7, False, 0.25)
        assert handle.rates_at(9)[0] == 0.0 and handle.rates_at(0)[0] == 0.25
    assert from_config.config == from_keywords.config == config
    overridden = dropbp.apply(tiny_llama(), config, seed=3, schedule="constant")
    assert (overridden.seed, overridden.schedule, overridden.drop_rates[0]) == (3, None, 0.25)
    assert config.seed == 7  # the caller's config is not changed
    assert dropbp.apply(tiny_llama(), 0.125).drop_rates[0] == 0.125  # a number is the drop rate
    # The masks follow the config exactly as they follow the keywords.
    for handle in (from_config, from_keywords):
        handle.step()
    assert from_config.mask == from_keywords.mask


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: dropbp.apply(m, {"drop_rate": 0.5}), "config must be a dropbp.DropBPConfig or a drop rate, got dict"),
        (lambda m: dropbp.apply(m, 0.5, drop_rate=0.25), "pass the drop rate once"),
        (lambda m: dropbp.apply(m, dropbp.DropBPConfig(), drop_rate=0.95), "exceeds max_rate 0.9"),
        (lambda m: dropbp.apply(m, dropbp.DropBPConfig(drop_schedule="cooldown:0.2")), "needs total_steps"),
    ],
)
def test_bad_configs_are_refused_before_anything_is_attached(llama, call, message):
    with pytest.raises(ValueError, match=message):
        call(llama)
    assert dropbp.find_handle(llama) is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in llama.modules())


def test_calibrate_takes_its_settings_from_the_config(batch):
    model = tiny_llama().train()
    handle = dropbp.apply(model, dropbp.DropBPConfig(drop_rate=0.3, max_rate=0.4, allocation="greedy"))
    closure = lambda: model(batch, labels=batch).loss  # noqa: E731
    rates = handle.calibrate([closure])
    explicit = dropbp.apply(tiny_llama().train(), drop_rate=0.0)
    explicit.model.load_state_dict(model.state_dict())
    expected = explicit.calibrate([lambda: explicit.model(batch, labels=batch).loss], 0.3, 0.4, "greedy")
    assert rates == expected
    assert max(rates) <= 0.4


def test_unknown_architecture_says_how_to_pass_branches():
    with pytest.raises(ValueError, match="branches="):
        dropbp.apply(TwoBlock())


def test_bad_handle_arguments(llama, batch):
    handle = dropbp.apply(llama)
    with pytest.raises(ValueError, match="already applied"):
        dropbp.apply(llama)
    with pytest.raises(ValueError, match="mask has 5 entries but there are 6 branches"):
        handle.set_mask([True] * 5)
    with pytest.raises(ValueError, match="expected 6 drop rates"):
        handle.set_drop_rates([0.1] * 7)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        handle.set_drop_rates([0.1] * 5 + [1.5])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        handle.set_drop_rates(float("nan"))
    with pytest.raises(ValueError, match="FLOPs of 6 branches are unknown"):
        handle.allocate(0.5, [1.0] * 6)
    llama.train()
    llama(batch)
    with pytest.raises(ValueError, match="expected 6 sensitivities"):
        handle.allocate(0.5, [1.0] * 5)
    with pytest.raises(ValueError, match=r"sensitivity\[2\]"):
        handle.allocate(0.5, [1.0, 1.0, -1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="target must be in"):
        handle.allocate(0.95, [1.0] * 6)
    with pytest.raises(ValueError, match="differ from this model"):
        handle.load_state_dict({**handle.state_dict(), "branches": ["a"]})


class SpanBlock(torch.nn.Module):
    """An MLP that is not one module (like OPT): fc1 -> act -> fc2, with a switchable failure."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)
        self.fail = False

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.fail:
            raise RuntimeError("boom")
        return (x + self.fc2(h)).sum()


def test_an_error_inside_a_span_restores_grad_mode_and_dispatch_modes():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    model = SpanBlock()
    handle = dropbp.apply(model, branches=["fc1..fc2"], drop_rate=0.0, auto_step=False)
    handle.set_mask([True])
    model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(2, 4))
    assert torch.is_grad_enabled() and _get_current_dispatch_mode() is None
    model.fail = False
    model(torch.randn(2, 4)).backward()
    assert model.fc1.weight.grad is None and model.fc2.weight.grad is None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("seed"), "lacks seed"),
        (lambda s: s.update(version=99), "version 99"),
        (lambda s: s.update(step=-1), "step must be an integer >= 0"),
        (lambda s: s.update(step=2.5), "step must be an integer >= 0, got 2.5"),
        (lambda s: s.update(drop_rates=[0.5]), "expected 6 drop rates"),
        (lambda s: s.update(sensitivities=[1.0]), "1 sensitivities for 6 branches"),
        (lambda s: s.update(seed="x"), "seed must be an integer"),
        (lambda s: s.update(seed=1.5), "seed must be an integer, got 1.5"),
        (lambda s: s.update(branches=["a"]), "differ from this model"),
    ],
)
def test_a_bad_state_changes_nothing(llama, change, message):
    handle = dropbp.apply(llama, seed=4)
    handle.set_drop_rates([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    handle.sensitivities = [1.0] * 6
    handle.step()
    before = handle.state_dict()
    state = {**before, "seed": 9, "step": 7, "sensitivities": [2.0] * 6, "drop_rates": [0.0] * 6}
    change(state)
    with pytest.raises(ValueError, match=message):
        handle.load_state_dict(state)
    assert handle.state_dict() == before
