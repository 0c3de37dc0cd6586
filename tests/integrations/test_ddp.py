"""DDP with 2 gloo processes launched by torchrun (CPU)."""

import subprocess
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from helpers import torchrun

import dropbp

WORKER = Path(__file__).with_name("ddp_worker.py")


def run_worker(mode: str, out: Path) -> subprocess.CompletedProcess:
    """Run the DDP worker (beside this file) in 2 gloo processes."""
    return torchrun(WORKER, "--mode", mode, "--out", str(out))


@pytest.mark.parametrize("mode", ["train", "train-checkpointing"])
def test_ddp_matches_single_process_on_the_global_batch(tmp_path, mode):
    result = run_worker(mode, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / f"{mode}.pt")

    # The same global batches in one process: the masks are the same because they depend only on (seed, step).
    from ddp_worker import STEPS, global_batch

    model = tiny_llama()
    model.train()
    handle = dropbp.apply(model, drop_rate=0.5, seed=7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        batch = global_batch(step)
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert handle.step_count == saved["masks_seen"] == STEPS
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_ddp_without_find_unused_parameters_is_refused(tmp_path):
    result = run_worker("no-unused", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert "find_unused_parameters=True" in (tmp_path / f"error-{rank}.txt").read_text()


def test_check_ranks_reports_masks_that_differ(tmp_path):
    result = run_worker("mismatch", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert "DropBP masks differ between rank" in (tmp_path / f"error-{rank}.txt").read_text()
