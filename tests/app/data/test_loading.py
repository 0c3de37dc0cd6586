"""Reading a user's data: every source (JSONL, JSON, CSV, Parquet, save_to_disk folders, a folder of
files, a Hub id in the cache) and every format (prompt/response, chat, Alpaca, ShareGPT, text),
through the real ``datasets`` library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import put_dataset_in_hub_cache, run_cli

from dropbp.app.data import DataError, is_text_data, load_examples, parse_columns

datasets = pytest.importorskip("datasets")

ALPACA = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                       {"from": "gpt", "value": "4"}, {"from": "human", "value": "and 3+3?"},
                       {"from": "gpt", "value": "6"}]},
]
CHAT = [{"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _error(source, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_examples(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- formats


def test_alpaca_rows_become_a_user_turn_and_its_answer(tmp_path):
    first, second = load_examples(_jsonl(tmp_path / "a.jsonl", ALPACA))
    assert (first["prompt"], first["response"]) == ("Add 2 and 3.", "5")
    assert (second["prompt"], second["response"]) == ("Translate to French.\n\ncat", "chat")
    assert second["instruction"] == "Translate to French."  # the row's own fields are kept


def test_alpaca_system_column_and_missing_input(tmp_path):
    (example,) = load_examples(_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Name a colour.", "output": "Red", "system": "One word only."}]))
    assert example["prompt"] == [{"role": "system", "content": "One word only."},
                                 {"role": "user", "content": "Name a colour."}]
    assert example["response"] == "Red"


def test_sharegpt_turns_become_chat_messages(tmp_path):
    first, second = load_examples(_jsonl(tmp_path / "s.jsonl", SHAREGPT))
    assert first["prompt"] == [{"role": "user", "content": "Hi"}] and first["response"] == "Hello!"
    assert [m["role"] for m in second["prompt"]] == ["system", "user", "assistant", "user"]
    assert second["response"] == "6"
    (with_system,) = load_examples(_jsonl(tmp_path / "t.jsonl", [{**SHAREGPT[0], "system": "Be kind."}]))
    assert with_system["prompt"][0] == {"role": "system", "content": "Be kind."}


def test_sharegpt_equals_the_same_conversation_in_chat_format(tmp_path):
    chat = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                          {"role": "assistant", "content": "6"}]}]
    (from_chat,) = load_examples(_jsonl(tmp_path / "c.jsonl", chat))
    (from_sharegpt,) = load_examples(_jsonl(tmp_path / "s.jsonl", SHAREGPT[1:]))
    assert (from_chat["prompt"], from_chat["response"]) == (from_sharegpt["prompt"], from_sharegpt["response"])


def test_trl_prompt_completion_rows(tmp_path):
    (example,) = load_examples(_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}]))
    assert (example["prompt"], example["response"]) == ("2+2=", "4")


def test_text_rows_and_is_text_data(tmp_path):
    examples = load_examples(_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}, {"text": "The end."}]))
    assert [e["text"] for e in examples] == ["Once upon a time.", "The end."]
    assert is_text_data(examples)
    assert not is_text_data(load_examples(_jsonl(tmp_path / "a.jsonl", ALPACA)))


def test_ultrachat_rows_with_a_prompt_field_are_chat(tmp_path):
    (example,) = load_examples(_jsonl(tmp_path / "u.jsonl", [{"prompt": "Capital of France?", **CHAT[0]}]))
    assert example["response"] == "Paris" and example["prompt"] == CHAT[0]["messages"][:1]


def test_data_format_overrides_detection(tmp_path):
    # tatsu-lab/alpaca rows carry a rendered "text" too: by default they are Alpaca, --data-format text trains the text
    row = {**ALPACA[0], "text": "### Instruction: Add 2 and 3. ### Response: 5"}
    path = _jsonl(tmp_path / "a.jsonl", [row])
    assert load_examples(path)[0]["response"] == "5"
    (text,) = load_examples(path, data_format="text")
    assert is_text_data([text]) and text["text"] == row["text"]
    assert "line 1: missing \"conversations\"" not in _error(path, data_format="sharegpt")
    assert 'line 1: "conversations" must be a non-empty array' in _error(path, data_format="sharegpt")


@pytest.mark.parametrize(
    ("rows", "data_format", "expected"),
    [
        ([{"question": "q", "answer": "a"}], "auto",
         'line 1: missing "prompt" (give "prompt" and "response", or "messages" for the chat format), or the fields '
         'of another format: "instruction"/"output" (Alpaca), "conversations" (ShareGPT) or "text"'),
        ([{"instruction": "i"}], "auto", 'line 1: missing "output"'),
        ([{"instruction": "i", "output": 5}], "auto", 'line 1: "output" must be a string, got number'),
        ([{"instruction": "i", "input": ["x"], "output": "o"}], "auto", 'line 1: "input" must be a string, got array'),
        ([SHAREGPT[0], {"conversations": [{"from": "bot", "value": "x"}]}], "auto",
         'line 2: conversations turn 1 is from "bot"; use "system", "human" or "gpt"'),
        ([{"conversations": [{"from": "human", "value": 3}]}], "auto",
         'line 1: conversations turn 1 must be an object with string "from" and "value"'),
        ([{"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}], "auto",
         'line 1: the last message is from "user"'),
        ([{"text": "ok"}, {"text": ""}], "auto", 'line 2: "text" is empty'),
        ([{"text": "ok"}, {"prompt": "p", "response": "r"}], "auto",
         'line 2: a "prompt"/"response" example in a file of "text" examples (line 1 is one)'),
        ([ALPACA[0], SHAREGPT[0]], "auto",
         'line 2: a ShareGPT ("conversations") example in a file of Alpaca ("instruction"/"output") examples'),
        ([{"prompt": "p", "response": "r"}], "alpaca", 'line 1: missing "instruction"'),
    ],
)
def test_bad_rows_name_the_line_and_the_field(tmp_path, rows, data_format, expected):
    path = _jsonl(tmp_path / "data.jsonl", rows)
    message = _error(path, data_format=data_format)
    assert message.startswith(f"{path} line ")
    assert expected in message


def test_unknown_data_format():
    assert "unknown data format 'csv'; use one of auto, prompt, chat, alpaca, sharegpt, text" in _error(
        "x.jsonl", data_format="csv")


# ----------------------------------------------------------------------------- column mapping


def test_columns_are_mapped_before_the_format_is_told(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer,id\nWhat is 2+2?,4,1\nCapital of Italy?,Rome,2\n", encoding="utf-8")
    examples = load_examples(path, columns="prompt=question,response=answer")
    assert [(e["prompt"], e["response"]) for e in examples] == [("What is 2+2?", "4"), ("Capital of Italy?", "Rome")]
    assert examples[0]["id"] == "1"  # CSV cells are text, as written
    assert load_examples(path, columns={"prompt": "question", "response": "answer"}) == examples


def test_a_mapped_column_replaces_the_field_of_that_name(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "old", "better_prompt": "new", "response": "r"}])
    (example,) = load_examples(path, columns="prompt=better_prompt")
    assert example["prompt"] == "new"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("promt=question", "--data-columns: no format reads a field 'promt'; did you mean 'prompt'?"),
        ("prompt", "--data-columns entry 'prompt' needs the form FIELD=COLUMN"),
        ("prompt=", "has an empty name"),
        ("prompt=a,prompt=b", "gives the field 'prompt' twice"),
        ("prompt=a,response=a", "maps the column 'a' twice"),
    ],
)
def test_bad_column_mappings(spec, expected):
    with pytest.raises(DataError, match=__import__("re").escape(expected)):
        parse_columns(spec)


def test_a_mapped_column_that_is_not_there(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nq,a\n", encoding="utf-8")
    message = _error(path, columns="prompt=query,response=answer")
    assert message == (f"{path} row 1: no column 'query' (--data-columns maps it to 'prompt'); "
                       f"the columns are 'question', 'answer'")


# ----------------------------------------------------------------------------- sources


def test_parquet_file_and_its_bad_row(tmp_path):
    rows = ALPACA + [{"instruction": "Say hi.", "input": None, "output": "hi"}]
    path = tmp_path / "alpaca.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    examples = load_examples(path)
    assert [e["response"] for e in examples] == ["5", "chat", "hi"]
    assert examples[2]["prompt"] == "Say hi."  # a null input is no input
    bad = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows + [{"instruction": "x", "input": "", "output": None}]).to_parquet(str(bad))
    assert _error(bad) == f'{bad} row 4: "output" must be a string, got null'


def test_json_array_file(tmp_path):
    path = tmp_path / "alpaca_data.json"  # the original Alpaca release is one JSON array
    path.write_text(json.dumps(ALPACA), encoding="utf-8")
    assert [e["response"] for e in load_examples(path)] == ["5", "chat"]


def test_chat_rows_through_arrow_keep_only_role_and_content(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "name": "bot"}]},
            {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}]
    path = tmp_path / "chat.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))  # Arrow gives the second row's messages "name": None
    examples = load_examples(path)
    assert examples[1]["prompt"] == [{"role": "user", "content": "q2"}] and examples[1]["response"] == "a2"


def test_unreadable_files(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet")
    assert _error(path).startswith(f"{path}: cannot read as PARQUET (")
    assert _error(tmp_path / "nope.csv") == f"{tmp_path / 'nope.csv'}: file not found"


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(SHAREGPT).save_to_disk(str(tmp_path / "one"))
    assert [e["response"] for e in load_examples(tmp_path / "one")] == ["Hello!", "6"]
    assert load_examples(tmp_path / "one", split="test") == load_examples(tmp_path / "one")  # one split, read whole
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA),
                                   "test": datasets.Dataset.from_list(ALPACA[:1])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert len(load_examples(tmp_path / "dict")) == 2
    assert len(load_examples(tmp_path / "dict", split="test")) == 1
    assert _error(tmp_path / "dict", split="validation") == (
        f"{tmp_path / 'dict'} has no split 'validation'; its splits are 'train', 'test' "
        f"(pass one with --data-split or --eval-split)")


def test_a_folder_of_data_files_and_an_empty_folder(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", ALPACA)
    _jsonl(folder / "test.jsonl", ALPACA[:1])
    assert len(load_examples(folder)) == 2
    assert len(load_examples(folder, split="test")) == 1
    (tmp_path / "empty").mkdir()
    assert _error(tmp_path / "empty") == (f"{tmp_path / 'empty'}: is a folder without a saved dataset (save_to_disk) "
                                          f"or data files (.jsonl, .json, .csv, .parquet)")


# ----------------------------------------------------------------------------- the Hub, through its cache


def test_a_hub_dataset_loads_offline_from_the_cache(tmp_path):
    put_dataset_in_hub_cache(tmp_path / "hf", "someone/tiny-alpaca", ALPACA)
    script = ("import json; from dropbp.app.data import load_examples; "
              "print(json.dumps([(e['prompt'], e['response']) for e in load_examples('someone/tiny-alpaca')]))")
    done = run_cli(tmp_path / "hf", "-c", script)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [["Add 2 and 3.", "5"],
                                                                 ["Translate to French.\n\ncat", "chat"]]
    assert "Using the latest cached version" not in done.stderr  # the cache notice is not about the run


def test_a_hub_dataset_that_is_not_cached_is_a_one_line_error(tmp_path):
    script = ("from dropbp.app.data import DataError, load_examples\n"
              "try:\n    load_examples('someone/not-fetched')\n"
              "except DataError as e:\n    print('ERROR', e)\n")
    done = run_cli(tmp_path / "hf", "-c", script)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("ERROR dataset 'someone/not-fetched' is not a local file or folder and is not in the "
                           "Hugging Face cache, and offline mode is on (HF_HUB_OFFLINE)")
    assert "datasets.load_dataset('someone/not-fetched')" in line


def test_a_hub_dataset_with_several_configurations_needs_data_config(tmp_path):
    put_dataset_in_hub_cache(tmp_path / "hf", "someone/mixed", ALPACA, config="alpaca")
    put_dataset_in_hub_cache(tmp_path / "hf", "someone/mixed", SHAREGPT, config="sharegpt")
    script = ("from dropbp.app.data import DataError, load_examples\n"
              "print('OK', [e['response'] for e in load_examples('someone/mixed', config='sharegpt')])\n"
              "for config in (None, 'nope'):\n"
              "    try:\n        load_examples('someone/mixed', config=config)\n"
              "    except DataError as e:\n        print('ERROR', e)\n")
    done = run_cli(tmp_path / "hf", "-c", script)
    assert done.returncode == 0, done.stderr
    ok, several, wrong = done.stdout.strip().splitlines()[-3:]
    assert ok == "OK ['Hello!', '6']"
    assert several.startswith("ERROR dataset 'someone/mixed' has several configurations; pass one with --data-config")
    assert "alpaca, sharegpt" in several
    assert wrong.startswith("ERROR dataset 'someone/mixed' has no configuration 'nope'") and "sharegpt" in wrong
