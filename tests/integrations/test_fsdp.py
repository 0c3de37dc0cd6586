"""FSDP2 (fully_shard) and FSDP1 (FullyShardedDataParallel) with 2 gloo processes launched by torchrun (CPU).

Accelerate enables its FSDP path only for GPU-type distributed setups, so on CPU FSDP1 is
wrapped with torch's own API here; test_accelerate.py covers ``accelerate launch`` (DDP).
Sensitivity works under FSDP2 (parameters gathered for it) and is refused under FSDP1.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from helpers import torchrun

import dropbp

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp1"])
def test_fsdp_matches_single_process_on_the_global_batch(tmp_path, mode):
    result = torchrun(WORKER, "--mode", mode, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / f"{mode}.pt")

    from ddp_worker import PER_RANK, STEPS, global_batch

    model = tiny_llama()
    model.train()
    handle = dropbp.apply(model, drop_rate=0.5, seed=7)
    assert saved["branches"] == [b.name for b in handle.branches]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        batch = global_batch(step)
        model(batch, labels=batch).loss.backward()
        assert saved["masks"][step] == handle.mask
        for name, p in model.named_parameters():
            got = saved["grads"][step][name]
            if mode == "fsdp1" and p.grad is None and got is not None:
                # FSDP1 reduces whole flat parameters: a dropped branch's slice comes back as zeros.
                assert not got.any(), f"step {step}: {name}"
                continue
            assert (got is None) == (p.grad is None), f"step {step}: {name}"
            if got is not None:
                torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert any(g is None for g in saved["grads"][0].values())  # something was dropped
    assert saved["steps"] == handle.step_count == STEPS
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    outcomes = [json.loads((tmp_path / f"outcome-{rank}.json").read_text()) for rank in (0, 1)]
    if mode == "fsdp1":  # refused on every rank (no rank left waiting in a collective)
        for outcome in outcomes:
            assert "FSDP1 flattens parameters" in outcome["sensitivity_error"]
            assert "FSDP1 flattens parameters" in outcome["callback_error"]
        return
    # FSDP2: each rank measured its own half of the last batch; the average equals the single-process one.
    assert outcomes[0] == outcomes[1]
    # the callback accepts FSDP2; called outside a Trainer (as here) it then refuses for that reason alone
    assert "no transformers.Trainer is running this callback" in outcomes[0]["callback_error"]
    halves = [global_batch(STEPS - 1)[rank * PER_RANK : (rank + 1) * PER_RANK] for rank in (0, 1)]
    per_half = [handle.sensitivity(lambda b=b: model(b, labels=b).loss) for b in halves]
    expected = [(a + b) / 2 for a, b in zip(*per_half)]
    assert outcomes[0]["sensitivities"] == pytest.approx(expected, rel=1e-4)
    assert outcomes[0]["rates"] == pytest.approx(handle.allocate(0.5, expected), rel=1e-4)
