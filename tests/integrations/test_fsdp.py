"""FSDP2 (fully_shard) and FSDP1 (FullyShardedDataParallel) with 2 gloo processes launched by torchrun (CPU).

Accelerate enables its FSDP path only for GPU-type distributed setups, so on CPU FSDP1 is
wrapped with torch's own API here; test_accelerate.py covers ``accelerate launch`` (DDP).
"""

import pytest
import torch
from conftest import tiny_llama
from test_ddp import torchrun

import dropbp


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp1"])
def test_fsdp_matches_single_process_on_the_global_batch(tmp_path, mode):
    result = torchrun(mode, tmp_path, worker="fsdp_worker.py")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / f"{mode}.pt")

    from ddp_worker import STEPS, global_batch

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
    for rank in (0, 1):  # refused on every rank (no rank left waiting in a collective)
        assert "FSDP shards them" in (tmp_path / f"sensitivity-{rank}.txt").read_text()
        assert "FSDP shards them" in (tmp_path / f"callback-{rank}.txt").read_text()
