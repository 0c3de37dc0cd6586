"""DropBPPlugin in real Axolotl training runs (``python -m axolotl.cli.train``) on CPU.

Axolotl brings about 4 GB of dependencies, so it lives in its own virtual environment,
``.venv-axolotl``; run this module with ``.venv-axolotl/bin/python -m pytest tests/integrations/test_axolotl.py``.
In an environment without Axolotl (the main ``.venv``) it is skipped.

Every run is a subprocess, as a user would start it: Axolotl loads plugins into process-wide
singletons, so one process per run keeps the runs independent. The model is a tiny random-weight
Llama with a byte-level ChatML tokenizer, the data a few dozen arithmetic examples; no network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("axolotl")  # the bare package is cheap to import; its submodules pull in torch & co.

from dropbp.testing import save_tiny_chat_model  # noqa: E402

MAX_STEPS = 4
ACCUMULATION = 2
SEED = 3  # not the default, so the checks see it passed from the YAML to the masks
RUN_TIMEOUT = 150  # seconds; a run takes 15-40 s on 2 cores, most of it imports

# No hub, no trackers, no GPU: the runs must work on a machine without network or accelerator.
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "disabled",
    "WANDB_DISABLED": "true",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "TOKENIZERS_PARALLELISM": "false",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with the tiny model (``model/``), the data (``data.jsonl``) and a Hugging Face cache (``hf/``)."""
    root = tmp_path_factory.mktemp("axolotl")
    save_tiny_chat_model(root / "model")
    rows = [
        {"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a in range(8) for b in range(4)
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def axolotl_config(root: Path, output_dir: Path, **overrides) -> dict:
    config = {
        "base_model": str(root / "model"),
        "plugins": ["dropbp.integrations.axolotl.DropBPPlugin"],
        "dropbp_drop_rate": 0.5,
        # Sensitivity is measured after step 1, before the checkpoint at step 2: the resumed
        # run must take the allocated rates from the checkpoint, not measure again.
        "dropbp_sensitivity_at": 0.25,
        "dropbp_seed": SEED,
        "datasets": [{"path": str(root / "data.jsonl"), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(root / "prepared"),
        "val_set_size": 0,
        "output_dir": str(output_dir),
        # The byte-level tokenizer makes the alpaca prompt about 130 tokens long.
        "sequence_len": 256,
        "sample_packing": False,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        # Axolotl's usual setting, with its default use_reentrant=True, which DropBP's
        # sensitivity measurement has to work around.
        "gradient_checkpointing": True,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": ACCUMULATION,
        "max_steps": MAX_STEPS,
        "num_epochs": 1,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "learning_rate": 1e-3,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "logging_steps": 1,
        "save_steps": 2,
        "seed": 0,
        "dataset_num_proc": 1,
    }
    return {**config, **overrides}


def train(root: Path, config: dict, name: str) -> subprocess.CompletedProcess:
    """Run ``python -m axolotl.cli.train`` on ``config`` (written as ``name.yml``); stdout and stderr together."""
    path = root / f"{name}.yml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    env = {**os.environ, **ENV, "HF_HOME": str(root / "hf")}
    return subprocess.run(
        [sys.executable, "-m", "axolotl.cli.train", str(path)], cwd=root, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=RUN_TIMEOUT, check=False,
    )


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"axolotl exited with {result.returncode}:\n{result.stdout[-6000:]}"


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def train_logs(state: dict) -> dict[int, dict]:
    return {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def full_run(workspace) -> Path:
    """The output folder of an uninterrupted run (checkpoints at steps 2 and 4)."""
    output = workspace / "full"
    check(train(workspace, axolotl_config(workspace, output), "full"))
    return output


def test_run_logs_drop_rates_and_checkpoints_dropbp_state(full_run):
    state = trainer_state(full_run / f"checkpoint-{MAX_STEPS}")
    logs = train_logs(state)
    assert sorted(logs) == list(range(1, MAX_STEPS + 1))  # logging_steps: 1
    for entry in logs.values():
        assert 0.0 <= entry["dropbp/drop_rate"] < 1.0
        assert 0.0 <= entry["dropbp/backward_flops_skipped"] < 1.0

    saved = state["stateful_callbacks"]["DropBPCallback"]
    assert saved["args"]["drop_rate"] == 0.5
    assert saved["args"]["sensitivity_at"] == 0.25
    assert saved["args"]["seed"] == SEED
    handle = saved["attributes"]["handle_state"]
    assert saved["attributes"]["measured"] is True
    # Two decoder layers, an attention and an MLP branch each, found inside the PEFT wrapper.
    assert [name.rsplit(".", 2)[-2:] for name in handle["branches"]] == [
        ["0", "self_attn"], ["0", "mlp"], ["1", "self_attn"], ["1", "mlp"],
    ]
    assert handle["step"] == MAX_STEPS * ACCUMULATION  # one mask per micro-batch
    assert handle["seed"] == SEED
    assert len(handle["sensitivities"]) == 4
    assert len(set(handle["drop_rates"])) > 1 and max(handle["drop_rates"]) <= 0.9  # allocated, capped at max_rate

    halfway = trainer_state(full_run / "checkpoint-2")["stateful_callbacks"]["DropBPCallback"]["attributes"]
    assert halfway["handle_state"]["step"] == 2 * ACCUMULATION
    assert halfway["measured"] is True  # measured after step 1


def test_resume_continues_the_masks_of_the_uninterrupted_run(workspace, full_run):
    output = workspace / "resumed"
    shutil.copytree(full_run / "checkpoint-2", output / "checkpoint-2")
    config = axolotl_config(workspace, output, resume_from_checkpoint=str(output / "checkpoint-2"))
    check(train(workspace, config, "resumed"))

    full = trainer_state(full_run / f"checkpoint-{MAX_STEPS}")
    resumed = trainer_state(output / f"checkpoint-{MAX_STEPS}")
    # Same mask step, mask, allocated rates and sensitivities: nothing restarted or re-measured.
    assert resumed["stateful_callbacks"]["DropBPCallback"] == full["stateful_callbacks"]["DropBPCallback"]
    # Steps 3 and 4 trained the same branches: same drop statistics, and the same gradients (a
    # different mask gives other LoRA weights a gradient, so another grad norm) and losses.
    full_logs, resumed_logs = train_logs(full), train_logs(resumed)
    for step in range(3, MAX_STEPS + 1):
        for key in ("dropbp/drop_rate", "dropbp/backward_flops_skipped"):
            assert resumed_logs[step][key] == full_logs[step][key], (step, key)
        for key in ("grad_norm", "loss"):
            assert resumed_logs[step][key] == pytest.approx(full_logs[step][key], rel=1e-5), (step, key)


def test_invalid_drop_rate_fails_validation_with_one_line_error(workspace):
    output = workspace / "invalid"
    result = train(workspace, axolotl_config(workspace, output, dropbp_drop_rate=1.5), "invalid")
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() if "invalid DropBP setting" in line]
    assert len(errors) == 1, result.stdout[-6000:]
    assert "dropbp_drop_rate must be in [0, 1)" in errors[0] and "got 1.5" in errors[0]
    assert "Starting trainer" not in result.stdout and not output.exists()  # refused before any work
