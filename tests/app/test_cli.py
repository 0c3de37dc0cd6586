"""The dropbp command on a tiny model folder saved to a temp dir (no downloads)."""

import json

import pytest

from dropbp.app.cli import main


def args(model_dir, out, *extra):
    return ["--model", str(model_dir), "--output-dir", str(out), "--max-steps", "4", "--batch-size", "4",
            "--seq-len", "160", "--eval-size", "4", "--sensitivity-at", "0.5", *extra]


def test_finetune_writes_the_run_folder(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", *args(model_dir, out)]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "summary.json", "adapter", "loss.png"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1].get("calibrated") is True
    assert all(r["activation_bytes"] > 0 and r["tokens_per_s"] > 0 for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sensitivities"] is not None and 0 <= summary["after"]["accuracy"] <= 1
    assert json.loads((out / "config.json").read_text())["dropbp"]["drop_rate"] == 0.5
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "run folder" in capsys.readouterr().out


def test_baseline_and_full_method(model_dir, tmp_path):
    out = tmp_path / "base"
    assert main(["finetune", *args(model_dir, out, "--no-dropbp", "--method", "full")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean_drop_rate"] == 0 and summary["drop_rates"] is None
    assert (out / "model" / "config.json").is_file()


def test_compare_prints_a_table_and_plots(model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *args(model_dir, out)]) == 0
    printed = capsys.readouterr().out
    for row in ("median_step_time_s", "tokens_per_s", "backward_flops_skipped", "activation_mb",
                "final_train_loss", "heldout_loss", "accuracy_after", "time_to_baseline_loss_s"):
        assert row in printed
    assert {"baseline", "dropbp", "compare.json", "compare.md", "loss_vs_time.png"} <= {p.name for p in out.iterdir()}
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert rows["baseline"]["backward_flops_skipped"] == 0 and rows["dropbp"]["backward_flops_skipped"] > 0
    assert rows["dropbp"]["activation_mb"] < rows["baseline"]["activation_mb"]


def test_sensitivity_command(model_dir, tmp_path, capsys):
    out = tmp_path / "sens"
    assert main(["sensitivity", "--model", str(model_dir), "--output-dir", str(out), "--seq-len", "160",
                 "--batch-size", "4"]) == 0
    rows = json.loads((out / "sensitivity.json").read_text())
    assert len(rows) == 4 and all(r["sensitivity"] > 0 for r in rows)
    assert (out / "sensitivity.png").is_file()
    assert "model.layers.1.mlp" in capsys.readouterr().out
    whole = tmp_path / "whole"
    assert main(["sensitivity", "--model", str(model_dir), "--output-dir", str(whole), "--seq-len", "160",
                 "--batch-size", "4", "--sensitivity-examples", "all"]) == 0
    on_all = [r["sensitivity"] for r in json.loads((whole / "sensitivity.json").read_text())]
    assert on_all != [r["sensitivity"] for r in rows]  # the default measures on fewer examples than the batch


def error_of(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_missing_model_folder(tmp_path, capsys):
    err = error_of(capsys, ["finetune", "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")])
    assert "does not exist" in err
    assert not (tmp_path / "o").exists()


def test_malformed_jsonl(model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    err = error_of(capsys, ["finetune", *args(model_dir, tmp_path / "o", "--data", str(data))])
    assert "line 2" in err
    assert not (tmp_path / "o").exists()


def test_drop_rate_out_of_range(model_dir, tmp_path, capsys):
    assert "drop_rate" in error_of(capsys, ["finetune", *args(model_dir, tmp_path / "o", "--drop-rate", "1.5")])


def test_existing_output_needs_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--overwrite" in error_of(capsys, ["finetune", *args(model_dir, out)])
    assert (out / "keep.txt").read_text() == "mine"


def test_sequence_length_too_long(model_dir, tmp_path, capsys):
    err = error_of(capsys, ["finetune", *args(model_dir, tmp_path / "o", "--seq-len", "4096")])
    assert "exceeds the model's maximum of 256" in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.partial-*"))


def test_user_jsonl_is_split_for_heldout(model_dir, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add {i} and 1.", "response": str(i + 1)}) + "\n"
                            for i in range(20)))
    out = tmp_path / "mine"
    assert main(["finetune", *args(model_dir, out, "--data", str(data))]) == 0
    assert json.loads((out / "summary.json").read_text())["after"]["accuracy"] >= 0


def test_fewer_examples_than_a_batch(model_dir, tmp_path, capsys):
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(3)))
    err = error_of(capsys, ["finetune", *args(model_dir, tmp_path / "o", "--data", str(data), "--eval-data", str(data))])
    assert "only 3 training examples for --batch-size 4" in err


def test_a_yaml_config_sets_the_flags_and_the_command_line_overrides_it(model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_dir}\nmax-steps: 3\nbatch_size: 4\nseq-len: 160\neval_size: 4\n"
                      "drop_rate: 0.25\nmask: structured\nreplay: false\n")
    out = tmp_path / "run"
    assert main(["finetune", "--config", str(config), "--output-dir", str(out), "--drop-rate", "0.5"]) == 0
    written = json.loads((out / "config.json").read_text())
    assert (written["max_steps"], written["batch_size"], written["seq_len"]) == (3, 4, 160)
    assert written["dropbp"]["drop_rate"] == 0.5  # the flag won
    assert (written["dropbp"]["mask"], written["dropbp"]["replay"]) == ("structured", False)  # not a flag: file only


def test_a_run_folders_config_json_repeats_the_run(model_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["finetune", *args(model_dir, first), "--drop-schedule", "cooldown:0.5", "--seed", "3"]) == 0
    assert main(["finetune", "--config", str(first / "config.json"), "--output-dir", str(second)]) == 0
    one, two = (json.loads((d / "config.json").read_text()) for d in (first, second))
    assert {**one, "output_dir": None} == {**two, "output_dir": None}
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (first, second)]
    assert losses[0] == losses[1]
    baseline = tmp_path / "baseline"
    assert main(["finetune", *args(model_dir, baseline), "--no-dropbp"]) == 0
    assert json.loads((baseline / "config.json").read_text())["use_dropbp"] is False
    again = tmp_path / "again"
    assert main(["finetune", "--config", str(baseline / "config.json"), "--output-dir", str(again)]) == 0
    assert json.loads((again / "config.json").read_text())["use_dropbp"] is False


@pytest.mark.parametrize(("text", "message"), [
    ("max_step: 3\n", "unknown key 'max_step'; did you mean 'max_steps'?"),
    ("- 3\n", "must hold a mapping of settings, got a list"),
    ("a: [\n", "is not valid YAML"),
])
def test_bad_config_files_are_one_line_errors(model_dir, tmp_path, capsys, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    assert main(["finetune", "--config", str(config), "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "x").exists()


def test_a_setting_of_another_command_is_named_as_such(model_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 3\n")
    assert main(["sensitivity", "--config", str(config), "--model", str(model_dir)]) == 2
    assert "'max_steps' is not a setting of dropbp sensitivity" in capsys.readouterr().err


def test_the_console_shows_the_run_only(model_dir, tmp_path):
    """No third-party notice that does not concern the run; the bar starts after the initial evaluation."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dropbp.app.cli", "finetune", *args(model_dir, tmp_path / "run"), "--eval-every", "2"],
        capture_output=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:]
    console = result.stdout
    assert "gemm_4bit" not in console and "kernels-community" not in console
    assert "Setting accelerator to CPU" not in console
    before = console.index("held-out before training: loss")
    assert before < console.index("finetune:   0%|") < console.index("step 2: held-out loss")
    assert console.index("step 4: held-out loss") < console.index("held-out after training: loss")
