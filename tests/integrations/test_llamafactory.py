"""examples/llamafactory_dropbp.py: DropBPCallback in a LLaMA-Factory LoRA SFT run (``run_exp``).

LLaMA-Factory pins transformers, peft, trl, accelerate and datasets below dropbp's newest, so it
lives in its own environment; where it is not installed this module is skipped. The example runs
in a subprocess (LLaMA-Factory configures logging and the process group globally) on CPU, on the
tiny random chat model and a tiny local alpaca-format dataset.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dropbp.testing import save_tiny_chat_model

pytest.importorskip("llamafactory")

EXAMPLE = Path(__file__).parents[2] / "examples" / "llamafactory_dropbp.py"
STEPS = 3


def test_example_logs_dropbp_metrics(tmp_path):
    model = save_tiny_chat_model(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(16)]
    (data / "tiny.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    out = tmp_path / "out"
    command = [sys.executable, str(EXAMPLE), "--model", str(model), "--template", "chatml", "--dataset", "tiny",
               "--dataset_dir", str(data), "--output_dir", str(out), "--max_steps", str(STEPS), "--cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "WANDB_DISABLED": "true"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"

    state = json.loads((out / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logs) == STEPS  # logging_steps=1
    for entry in logs:
        assert 0.0 <= entry["dropbp/drop_rate"] <= 1.0
        assert 0.0 <= entry["dropbp/backward_flops_skipped"] <= 1.0
    assert any(entry["dropbp/drop_rate"] > 0 for entry in logs)
    assert "DropBPCallback" in state["stateful_callbacks"]
    assert (out / "adapter_model.safetensors").exists()  # the LoRA adapter LLaMA-Factory saves
