"""DDP with 2 gloo processes launched by torchrun (CPU)."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import dropbp

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(mode: str, out: Path, worker: str = WORKER.name, *extra: str) -> subprocess.CompletedProcess:
    """Run ``worker`` (a script beside this file) in 2 gloo processes with ``extra`` arguments and wait for it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(WORKER.with_name(worker)), "--mode", mode, "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["train", "train-checkpointing"])
def test_ddp_matches_single_process_on_the_global_batch(tmp_path, mode):
    result = torchrun(mode, tmp_path)
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
    result = torchrun("no-unused", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert "find_unused_parameters=True" in (tmp_path / f"error-{rank}.txt").read_text()


def test_check_ranks_reports_masks_that_differ(tmp_path):
    result = torchrun("mismatch", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert "DropBP masks differ between rank" in (tmp_path / f"error-{rank}.txt").read_text()
