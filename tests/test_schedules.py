"""Drop-rate schedules: the rates at each step, masks as a pure function of them, and resume."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import dropbp
from dropbp.schedules import MAX_SCHEDULED_RATE, DropSchedule, parse_schedule, scheduled_rates


def rates_over(spec: str, total: int, base: float = 0.5) -> list[float]:
    schedule = parse_schedule(spec)
    return [schedule.rate(step, total, base) for step in range(total)]


def test_each_kind_moves_the_rate_as_documented():
    assert rates_over("constant", 4) == [0.5] * 4
    assert rates_over("warmup:0.5", 8) == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5])
    assert rates_over("cooldown:0.5", 8) == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.375, 0.25, 0.125, 0.0])
    assert rates_over("linear:0.75:0", 4) == pytest.approx([0.75, 0.5, 0.25, 0.0])
    cosine = rates_over("cosine:0.5:0", 5)
    assert cosine[0] == pytest.approx(0.5) and cosine[2] == pytest.approx(0.25) and cosine[-1] == pytest.approx(0.0)
    assert cosine[1] > 0.375 and cosine[3] < 0.125  # slow at both ends
    assert rates_over("linear:0.2:0.6", 1) == [pytest.approx(0.6)]  # a one-step run is at the end
    assert parse_schedule(" Cosine:0.50:0 ").spec == "cosine:0.5:0"


@pytest.mark.parametrize("spec, message", [
    ("sometimes", "is not one of constant, warmup:F"),
    ("warmup", "is not one of"),
    ("linear:0.5", "is not one of"),
    ("warmup:x", "not a number"),
    ("warmup:0", r"fraction must be in \(0, 1\]"),
    ("cooldown:1.5", r"fraction must be in \(0, 1\]"),
    ("linear:0.5:1", r"rates must be in \[0, 1\)"),
    ("cosine:-0.1:0", r"rates must be in \[0, 1\)"),
    (0.5, "must be a string"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    for build in (parse_schedule, lambda s: dropbp.DropBPConfig(drop_schedule=s)):
        with pytest.raises(ValueError, match=message) as info:
            build(spec)
        assert "\n" not in str(info.value)


def test_allocated_rates_are_scaled_and_clipped():
    schedule = DropSchedule("linear", (0.75, 0.0))
    assert scheduled_rates([0.2, 0.8], schedule, 0, 3, base=0.5) == pytest.approx([0.3, MAX_SCHEDULED_RATE])
    assert scheduled_rates([0.2, 0.8], schedule, 2, 3, base=0.5) == [0.0, 0.0]
    assert scheduled_rates([0.0, 0.0], schedule, 0, 3, base=0.0) == [0.75, 0.75]  # nothing to scale: the rate
    with pytest.raises(ValueError, match="gave the rate 1.5 at step 3"):
        scheduled_rates([0.5], lambda step: 1.5, 3, 0, base=0.5)


@pytest.mark.parametrize("schedule", ["cooldown:0.5", "linear:0.75:0", lambda step: 0.1 * (step % 5)])
def test_each_mask_is_the_pure_function_of_the_rates_at_its_step(schedule):
    model = tiny_llama(layers=2)
    model.train()
    handle = dropbp.apply(model, drop_rate=0.5, seed=7, schedule=schedule, total_steps=10)
    x = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    for step in range(10):
        model(x, labels=x).loss.backward()
        rates = handle.rates_at(step)
        assert handle.mask == dropbp.sample_mask(7, step, rates)
    assert handle.drop_rates == [0.5] * 4  # the configured rates stay; the schedule scales them per step
    if isinstance(schedule, str):
        assert handle.rates_at(9) == [0.0] * 4  # the last step is exact


def test_resume_continues_the_same_masks_and_weights():
    """Ten steps in one go, and five + save + a fresh model that loads the state and runs five more: bitwise equal."""
    x = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))

    def build():
        model = tiny_llama(layers=2)
        model.train()
        handle = dropbp.apply(model, drop_rate=0.5, seed=3, schedule="cosine:0.75:0", total_steps=10)
        return model, handle, torch.optim.SGD(model.parameters(), lr=0.1)

    def train(model, handle, optimizer, steps):
        masks = []
        for _ in range(steps):
            model(x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            masks.append(handle.mask)
        return masks

    model, handle, optimizer = build()
    full = train(model, handle, optimizer, 10)
    first, first_handle, first_optimizer = build()
    head = train(first, first_handle, first_optimizer, 5)
    state, weights = first_handle.state_dict(), first.state_dict()
    resumed, resumed_handle, resumed_optimizer = build()
    resumed.load_state_dict(weights)
    resumed_handle.load_state_dict(state)
    tail = train(resumed, resumed_handle, resumed_optimizer, 5)
    assert head + tail == full
    for name, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name

    other_model = tiny_llama(layers=2)
    other = dropbp.apply(other_model, drop_rate=0.5, seed=3, schedule="cooldown:0.2", total_steps=10)
    with pytest.raises(ValueError, match="saved with drop schedule 'cosine:0.75:0' over 10 steps") as info:
        other.load_state_dict(state)
    assert "\n" not in str(info.value)


def test_apply_refuses_a_schedule_it_cannot_follow():
    model = tiny_llama(layers=2)
    with pytest.raises(ValueError, match="needs total_steps"):
        dropbp.apply(model, schedule="warmup:0.1")
    with pytest.raises(ValueError, match="is not one of"):
        dropbp.apply(model, schedule="bogus", total_steps=5)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    handle = dropbp.apply(model, schedule="constant")  # needs no length
    assert handle.schedule is None


def test_the_axolotl_key_builds_the_schedule():
    pytest.importorskip("pydantic")
    from dropbp.integrations.axolotl import dropbp_config

    assert dropbp_config({"dropbp_drop_schedule": "warmup:0.1"}).drop_schedule == "warmup:0.1"
    with pytest.raises(ValueError, match="dropbp_drop_schedule 'often' is not one of") as info:
        dropbp_config({"dropbp_drop_schedule": "often"})
    assert "\n" not in str(info.value)
