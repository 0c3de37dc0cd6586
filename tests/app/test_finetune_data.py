"""A user's data through ``dropbp finetune``: the formats and sources of issue 23 reach the run, bad rows stop it
before anything trains, and a Hub model with a Hub dataset trains and merges offline from the cache."""

from __future__ import annotations

import json

import pytest
from helpers import hub_cache, put_dataset_in_hub_cache, run_cli

from dropbp.app.cli import main

datasets = pytest.importorskip("datasets")

ALPACA = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a in range(4) for b in range(3)]
TINY = ["--max-steps", "2", "--batch-size", "2", "--seq-len", "96", "--eval-size", "2", "--eval-every", "0"]


def _finetune(model_dir, out, *extra) -> int:
    return main(["finetune", "--model", str(model_dir), "--output-dir", str(out), *TINY, *extra])


def test_alpaca_parquet_with_a_held_out_parquet(model_dir, tmp_path, capsys):
    train, heldout = tmp_path / "train.parquet", tmp_path / "heldout.parquet"
    datasets.Dataset.from_list(ALPACA).to_parquet(str(train))
    datasets.Dataset.from_list(ALPACA[:3]).to_parquet(str(heldout))
    assert _finetune(model_dir, tmp_path / "run", "--data", str(train), "--eval-data", str(heldout)) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert isinstance(summary["after"]["accuracy"], float)
    assert "held-out accuracy" in capsys.readouterr().out


def test_text_data_trains_on_every_token_and_reports_no_accuracy(model_dir, tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Document {i}: " + "lorem ipsum " * (i + 3)}) + "\n"
                            for i in range(12)), encoding="utf-8")
    assert _finetune(model_dir, tmp_path / "run", "--data", str(docs), "--seq-len", "48") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["after"]["accuracy"] is None and summary["after"]["heldout_loss"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens"] > 0 for r in records)
    out = capsys.readouterr().out
    assert "accuracy" not in out and "held-out loss" in out


def test_columns_and_format_from_the_command_line(model_dir, tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\n" + "".join(f"What is {i}+1?,{i + 1}\n" for i in range(12)), encoding="utf-8")
    assert _finetune(model_dir, tmp_path / "run", "--data", str(path), "--data-columns",
                     "prompt=question,response=answer", "--data-format", "prompt") == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data_columns"] == "prompt=question,response=answer" and config["data_format"] == "prompt"


def test_a_bad_column_mapping_is_a_one_line_error(model_dir, tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n", encoding="utf-8")
    assert _finetune(model_dir, tmp_path / "run", "--data", str(path), "--data-columns", "promt=question") == 2
    err = capsys.readouterr().err.strip()
    assert "no format reads a field 'promt'; did you mean 'prompt'?" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_bad_row_stops_the_run_before_training(model_dir, tmp_path, capsys):
    rows = ALPACA + [{"instruction": "Say hi.", "input": "", "output": None}]
    path = tmp_path / "alpaca.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    capsys.readouterr()
    assert _finetune(model_dir, tmp_path / "run", "--data", str(path)) == 2
    err = capsys.readouterr().err.strip()
    assert f'{path} row 13: "output" must be a string, got null' in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_hub_model_and_a_hub_dataset_train_and_merge_offline(tmp_path):
    """The README's line: dropbp finetune --model <hub id> --data <dataset> --merge."""
    root = put_dataset_in_hub_cache(hub_cache(tmp_path / "hf"), "someone/tiny-alpaca", ALPACA)
    out = tmp_path / "run"
    done = run_cli(root, "-m", "dropbp.app.cli", "finetune", "--model", "tiny-org/tiny-chat",
                   "--data", "someone/tiny-alpaca", "--merge", "--output-dir", str(out), *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "tokenizer_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["data"] == "someone/tiny-alpaca"
    assert "Using the latest cached version" not in done.stderr
