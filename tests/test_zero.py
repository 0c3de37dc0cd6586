"""dropbp.zero without DeepSpeed: the explicit guard, against a small fake engine and ZeRO optimizer (the real engine tests are in tests/integrations/test_deepspeed.py)."""

import pytest
import torch
from conftest import tiny_llama

import dropbp


def test_guard_refuses_what_is_not_a_deepspeed_engine():
    with pytest.raises(ValueError, match="needs the engine deepspeed.initialize returned, got LlamaForCausalLM"):
        dropbp.zero.guard(tiny_llama())
    with pytest.raises(ValueError, match="got object"):
        dropbp.zero.guard(object())


# --------------------------------------------------------------- a small fake of a DeepSpeed engine


class FakeOffload:
    def __init__(self, device):
        self.device = device


class FakeZeroOptimizer:
    """Holds its fp32 partitions (ZeRO-1/2) and its flat gradient buffer (ZeRO-3) where DeepSpeed 0.19 does."""

    def __init__(self):
        self.steps = 0
        flat = torch.zeros(4)
        flat.grad = torch.ones(4)
        self.single_partition_of_fp32_groups = [flat]
        self.grad_partitions_flat_buffer = torch.ones(6)
        self.fp32_partitioned_groups_flat = [flat]

    def step(self):
        self.steps += 1
        return "stepped"


class UnknownOptimizer:
    """A ZeRO optimizer of another DeepSpeed version: its buffers are not where 0.19 keeps them."""

    def step(self):
        return "stepped"


class FakeEngine:
    def __init__(self, module, stage=2, offload=None, accumulation=1, optimizer=None):
        self.module, self.stage, self.offload, self.accumulation = module, stage, offload, accumulation
        self.optimizer = FakeZeroOptimizer() if optimizer is None else optimizer

    def zero_optimization_stage(self):
        return self.stage

    def zero_offload_optimizer(self):
        return FakeOffload(self.offload)

    def gradient_accumulation_steps(self):
        return self.accumulation


@pytest.mark.parametrize(("stage", "offload"), [(1, None), (2, None)])
def test_zero_1_and_2_without_offload_need_no_guard(stage, offload):
    engine = FakeEngine(tiny_llama(), stage=stage, offload=offload)
    dropbp.zero.guard(engine)
    assert "step" not in engine.optimizer.__dict__


@pytest.mark.parametrize(("stage", "offload", "buffers"), [
    (2, "cpu", lambda o: [o.single_partition_of_fp32_groups[0].grad]),
    (3, None, lambda o: [o.grad_partitions_flat_buffer]),
    (3, "cpu", lambda o: [o.grad_partitions_flat_buffer, o.fp32_partitioned_groups_flat[0].grad]),
])
def test_the_guard_zeroes_the_kept_gradient_buffers_after_each_step_and_is_released(stage, offload, buffers):
    model = tiny_llama()
    handle = dropbp.apply(model, drop_rate=0.5)
    engine = FakeEngine(model, stage=stage, offload=offload)
    dropbp.zero.guard(engine)
    dropbp.zero.guard(engine)  # a second guard of the same optimizer wraps nothing again
    optimizer = engine.optimizer
    assert all(b.abs().sum() > 0 for b in buffers(optimizer))
    assert optimizer.step() == "stepped" and optimizer.steps == 1  # the optimizer's own step ran, once
    assert all(b.abs().sum() == 0 for b in buffers(optimizer))
    handle.remove()  # releases the guard: the optimizer's own step again
    assert "step" not in optimizer.__dict__
    assert optimizer.step() == "stepped"


@pytest.mark.parametrize(("engine", "message"), [
    (lambda m: FakeEngine(m, stage=2, offload="nvme"), "cannot zero the gradients DeepSpeed swaps to NVMe"),
    (lambda m: FakeEngine(m, stage=3, optimizer=UnknownOptimizer()), "does not keep its gradient partitions where"),
    (lambda m: FakeEngine(m, stage=2, offload="cpu", optimizer=UnknownOptimizer()),
     "does not keep its gradient partitions"),
])
def test_what_the_guard_cannot_make_exact_is_refused(engine, message):
    with pytest.raises(dropbp.DropBPError, match=message):
        dropbp.zero.guard(engine(tiny_llama()))


def test_offload_with_accumulation_and_a_mask_per_micro_batch_is_refused_once_auto_step_is_known():
    engine = FakeEngine(tiny_llama(), stage=2, offload="cpu", accumulation=4)
    dropbp.zero.guard(engine)  # auto_step not known yet: that check waits for the first forward
    with pytest.raises(dropbp.DropBPError, match="optimizer offload keeps a parameter's gradient only from the last"):
        dropbp.zero.guard(FakeEngine(tiny_llama(), stage=2, offload="cpu", accumulation=4), auto_step=True)
    dropbp.zero.guard(FakeEngine(tiny_llama(), stage=2, offload="cpu", accumulation=4), auto_step=False)
