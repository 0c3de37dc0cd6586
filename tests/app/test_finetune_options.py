"""The fine-tuner's options: accumulation, checkpointing, schedule, held-out evaluation, device and dtype."""

import json

import pytest
import torch

from dropbp.app.cli import main
from dropbp.app.finetune import BatchStream, FinetuneConfig, time_to_heldout


def run(model_dir, out, *extra):
    code = main(["finetune", "--model", str(model_dir), "--output-dir", str(out), "--max-steps", "6",
                 "--batch-size", "2", "--seq-len", "160", "--eval-size", "2", "--eval-subset", "2",
                 "--sensitivity-at", "0.5", *extra])
    assert code == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_warmup_then_cosine_and_periodic_heldout_loss(model_dir, tmp_path):
    records = run(model_dir, tmp_path / "run", "--warmup-ratio", "0.5", "--eval-every", "2", "--lr", "0.01")
    lrs = [r["lr"] for r in records]
    assert lrs[:3] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01])  # linear warm-up over 3 steps
    assert lrs[3] > lrs[4] > lrs[5] == pytest.approx(0.0)  # then cosine down to 0
    assert [r["step"] for r in records if "heldout_loss" in r] == [2, 4, 6]
    clock = [r["wall_time_s"] for r in records]
    assert clock == sorted(clock) and clock[-1] <= sum(r["step_time_s"] for r in records) + 60


def test_constant_schedule(model_dir, tmp_path):
    records = run(model_dir, tmp_path / "run", "--lr-schedule", "constant", "--warmup-ratio", "0", "--lr", "0.01")
    assert {r["lr"] for r in records} == {0.01}


def test_gradient_accumulation_and_checkpointing(model_dir, tmp_path):
    records = run(model_dir, tmp_path / "run", "--grad-accum", "2", "--gradient-checkpointing")
    assert len(records) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["grad_accum"] == 2 and config["gradient_checkpointing"] is True
    assert records[0]["tokens"] > 0


def test_bfloat16_autocast_on_cpu(model_dir, tmp_path):
    records = run(model_dir, tmp_path / "run", "--dtype", "bfloat16", "--device", "cpu")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error(model_dir, tmp_path, capsys):
    assert main(["finetune", "--model", str(model_dir), "--output-dir", str(tmp_path / "x"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "torch sees no CUDA GPU" in err and "\n" not in err


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--grad-accum", "0", "grad-accum must be >= 1"),
    ("--warmup-ratio", "1.5", "warmup-ratio must be in [0, 1)"),
    ("--eval-every", "-1", "eval-every must be >= 0"),
    ("--save-every", "-2", "save-every must be >= 0"),
    ("--sensitivity-examples", "0", "sensitivity_examples must be an integer >= 1"),
])
def test_bad_values_are_one_line_errors(model_dir, tmp_path, capsys, flag, value, message):
    assert main(["finetune", "--model", str(model_dir), "--output-dir", str(tmp_path / "x"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_compare_reports_time_to_the_baselines_heldout_loss(model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(model_dir), "--output-dir", str(out), "--max-steps", "4",
                 "--batch-size", "2", "--seq-len", "160", "--eval-size", "2", "--eval-subset", "2",
                 "--eval-every", "2", "--sensitivity-at", "0.5"]) == 0
    result = json.loads((out / "compare.json").read_text())
    rows = result["rows"]
    baseline = rows["baseline"]
    assert baseline["time_to_baseline_heldout_s"] is not None  # the baseline reaches its own final value
    assert baseline["time_to_baseline_heldout_s"] <= baseline["train_time_s"]
    assert rows["dropbp"]["sensitivity_cost_steps"] > 0
    assert "evaluation" in (out / "compare.md").read_text()
    assert "held-out loss" in capsys.readouterr().out


def test_time_to_heldout_and_the_batch_stream():
    history = [{"wall_time_s": 1.0, "heldout_loss": 2.0}, {"wall_time_s": 2.0}, {"wall_time_s": 3.0, "heldout_loss": 1.0}]
    assert time_to_heldout(history, 1.5) == 3.0
    assert time_to_heldout(history, 0.5) is None and time_to_heldout(history, None) is None
    stream = BatchStream(list(range(10)), 4, seed=3)
    first = [next(stream) for _ in range(5)]
    resumed = BatchStream(list(range(10)), 4, seed=3)
    state = BatchStream(list(range(10)), 4, seed=3)
    for _ in range(3):
        next(state)
    resumed.load_state_dict(state.state_dict())
    assert [next(resumed) for _ in range(2)] == first[3:]
    assert sorted(first[0] + first[1]) == sorted(set(first[0] + first[1]))  # no repeats within an epoch


def test_config_round_trips_the_new_fields():
    config = FinetuneConfig(grad_accum=3, lr_schedule="constant", device="cpu", dtype="float32", save_every=5)
    assert FinetuneConfig(**config.to_dict()) == config


def test_the_sensitivity_sample_is_cut_to_its_own_length_without_changing_the_loss(model_dir):
    from transformers import AutoModelForCausalLM

    from dropbp.app.finetune import first_examples

    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 6, 7, 8, 9, 10]])
    mask = (torch.arange(6) < torch.tensor([[3], [6]])).long()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    sample = first_examples(batch, 1)
    assert sample["input_ids"].tolist() == [[5, 6, 7]] and sample["labels"].tolist() == [[5, 6, 7]]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    padded = {k: v[:1] for k, v in batch.items()}
    torch.testing.assert_close(model(**sample).loss, model(**padded).loss)
    assert first_examples(batch, None) is batch


def test_drop_schedule_reaches_the_masks_and_the_run_folder(model_dir, tmp_path):
    records = run(model_dir, tmp_path / "run", "--drop-schedule", "cooldown:0.5", "--sensitivity-at", "none")
    assert [r["drop_rate"] for r in records][-1] == 0.0  # the last mask step is exact
    assert records[0]["drop_rate"] > 0.0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dropbp"]["drop_schedule"] == "cooldown:0.5"


def test_structured_masks_reach_the_run(model_dir, tmp_path):
    from dropbp.masks import sample_structured_mask

    records = run(model_dir, tmp_path / "run", "--mask", "structured", "--sensitivity-at", "none", "--seed", "3")
    branches = 4  # 2 layers x (attention, MLP)
    expected = [sum(sample_structured_mask(3, t, [0.5] * branches)) / branches for t in range(len(records))]
    assert [r["drop_rate"] for r in records] == expected
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dropbp"]["mask"] == "structured"


def test_structured_masks_with_sensitivity_are_a_one_line_error(model_dir, tmp_path, capsys):
    assert main(["finetune", "--model", str(model_dir), "--output-dir", str(tmp_path / "run"), "--mask", "structured",
                 "--sensitivity-at", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pass sensitivity_at=None" in err and "\n" not in err
