"""Resumable runs: a run killed with SIGKILL, or stopped with Ctrl-C, continues to the same losses and weights."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dropbp.app.cli import main

STEPS = 60


def run_args(model_dir, out, *extra):
    return ["finetune", "--model", str(model_dir), "--output-dir", str(out), "--max-steps", str(STEPS),
            "--batch-size", "4", "--seq-len", "160", "--eval-size", "4", "--eval-subset", "4", "--eval-every", "5",
            "--sensitivity-at", "0.3", "--threads", "1", *extra]


def start(model_dir, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "dropbp.app.cli", *run_args(model_dir, out, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (status {process.returncode}) before it could be interrupted: "
                        f"{process.stderr.read()[-500:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run did not get far enough in time")
        time.sleep(0.01)


def steps_done(out: Path) -> int:
    metrics = out.with_name(out.name + ".partial") / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def outcome(out: Path):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "lr", "drop_rate", "heldout_loss", "calibrated")
    return [{k: r.get(k) for k in keys} for r in records], load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(run_args(model_dir, out)) == 0
    return outcome(out)


def assert_same(got, expected):
    assert got[0] == expected[0]  # losses, rates, held-out losses: bitwise
    assert got[1].keys() == expected[1].keys()
    for name in expected[1]:
        assert torch.equal(got[1][name], expected[1][name]), name


def test_a_killed_run_resumes_to_the_same_losses_and_weights(model_dir, tmp_path, uninterrupted, capsys):
    out = tmp_path / "run"
    process = start(model_dir, out, "--save-every", "4")
    wait_for(lambda: steps_done(out) >= 22, process)  # past the calibration (step 18) and several checkpoints
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = out.with_name("run.partial")
    assert not out.exists() and (partial / "checkpoint" / "state.pt").is_file()
    assert main(["finetune", "--model", str(model_dir), "--output-dir", str(out)]) == 2  # a fresh start is refused
    assert "dropbp finetune --resume" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(out)]) == 0
    assert not partial.exists() and not (out / "checkpoint").exists()
    assert_same(outcome(out), uninterrupted)


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(model_dir, tmp_path, uninterrupted):
    out = tmp_path / "run"
    process = start(model_dir, out)  # no --save-every: only Ctrl-C writes a checkpoint
    wait_for(lambda: steps_done(out) >= 8, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    message = err.strip().splitlines()[-1]
    assert message.startswith("dropbp finetune: interrupted after step ")
    assert message.endswith(f"continue with: dropbp finetune --resume {out}")
    assert main(["finetune", "--resume", str(out.with_name("run.partial"))]) == 0  # the .partial name works too
    assert_same(outcome(out), uninterrupted)


def test_resume_errors_are_one_line(model_dir, tmp_path, capsys):
    assert main(["finetune", "--resume", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dropbp finetune: error: no interrupted run at") and "\n" not in err
    done = tmp_path / "done"
    assert main(run_args(model_dir, done)[:-2] + ["--max-steps", "2", "--threads", "1"]) == 0
    assert main(["finetune", "--resume", str(done)]) == 2
    assert "already finished" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_a_run_killed_before_any_checkpoint_leaves_no_checkpoint(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    process = start(model_dir, out)
    wait_for(lambda: steps_done(out) >= 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert main(["finetune", "--resume", str(out)]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
