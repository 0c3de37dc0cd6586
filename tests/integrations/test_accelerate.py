"""DropBPCallback in a Trainer started by ``accelerate launch`` on 2 CPU processes (gloo DDP).

``accelerate launch --cpu --num_processes 2`` starts a single process (accelerate's multi-CPU
launch goes through mpirun with a hostfile); ``--multi_gpu`` starts the processes with torchrun,
and ``TrainingArguments(use_cpu=True)`` in the worker makes accelerate set them up as MULTI_CPU
with gloo. Both launches run in a module fixture (each costs tens of seconds of imports).
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("accelerate_worker.py")
RANKS = (0, 1)


def accelerate_launch(phase: int, out: Path) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(WORKER), "--phase", str(phase), "--out", str(out)]
    # A private HF_HOME: no default_config.yaml of the user's accelerate can change the launch.
    env = {**os.environ, "HF_HOME": str(out / "hf_home")}
    # Its own session, so a hang can be ended with the torchrun workers, not just the launcher.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per tag, per rank: the worker's record with its final weights; ``out``: the launch directory."""
    out = tmp_path_factory.mktemp("accelerate")
    for phase in (1, 2):
        result = accelerate_launch(phase, out)
        assert result.returncode == 0, f"phase {phase}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    records = {}
    for tag in ("full", "cut-1", "cut-2", "cut-3"):
        records[tag] = []
        for rank in RANKS:
            record = json.loads((out / f"{tag}-rank{rank}.json").read_text())
            record["weights"] = torch.load(out / f"{tag}-rank{rank}.pt")
            records[tag].append(record)
    records["out"] = out
    return records


@pytest.mark.parametrize("tag", ["full", "cut-1", "cut-2", "cut-3"])
def test_ranks_agree_on_masks_rates_and_gradients(runs, tag):
    ranks = runs[tag]
    for record in ranks:
        assert record["world_size"] == 2 and record["backend"] == "gloo"
        assert record["distributed_type"] == "DistributedType.MULTI_CPU"
        assert record["wrapper"] == "DistributedDataParallel" and record["find_unused_parameters"] is True
        assert record["gradients_differing"] and not any(record["gradients_differing"]), record["gradients_differing"]
    zero, one = ranks
    for key in ("masks", "step_count", "drop_rates", "sensitivities", "logged", "parameters_without_grad"):
        assert zero[key] == one[key], key
    # some branches were dropped in both micro-batches of a step: their parameters got no gradient on either rank
    assert any(zero["parameters_without_grad"])
    for name, value in zero["weights"].items():
        assert torch.equal(value, one["weights"][name]), name


def test_full_run_measures_and_allocates(runs):
    full = runs["full"][0]
    assert full["global_step"] == 6 and full["step_count"] == 6 * 2 == len(full["masks"])
    assert full["sensitivities"] is not None and len(full["sensitivities"]) == 6
    assert full["drop_rates"] != [0.5] * 6
    # uniform rates up to step 3, allocated ones afterwards
    assert [e["dropbp/drop_rate"] for e in full["logged"]][:2] == [0.5, 0.5]


def _saved_callback_state(checkpoint: Path) -> dict:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["stateful_callbacks"]["DropBPCallback"]["attributes"]


@pytest.mark.parametrize("rank", RANKS)
def test_resume_continues_the_same_masks_and_weights(runs, rank):
    """6 steps straight vs 2 + 2 (measured after the resume point) + 2 (measured before it)."""
    full, first, second, third = (runs[tag][rank] for tag in ("full", "cut-1", "cut-2", "cut-3"))
    assert [first["global_step"], second["global_step"], third["global_step"]] == [2, 4, 6]
    # checkpoint-2 precedes the measurement after step 3, checkpoint-4 follows it
    assert _saved_callback_state(runs["out"] / "cut" / "checkpoint-2")["measured"] is False
    assert _saved_callback_state(runs["out"] / "cut" / "checkpoint-4")["measured"] is True
    assert first["sensitivities"] is None and first["drop_rates"] == [0.5] * 6
    assert first["masks"] + second["masks"] + third["masks"] == full["masks"]
    for resumed in (second, third):
        assert resumed["drop_rates"] == pytest.approx(full["drop_rates"], rel=1e-6)
        assert resumed["sensitivities"] == pytest.approx(full["sensitivities"], rel=1e-6)
    assert third["step_count"] == full["step_count"]
    # log_history comes back from the checkpoint: steps 1-4 as saved, then 5 and 6
    assert third["logged"] == full["logged"]
    for name, value in full["weights"].items():
        torch.testing.assert_close(third["weights"][name], value, rtol=1e-6, atol=1e-7, msg=name)
