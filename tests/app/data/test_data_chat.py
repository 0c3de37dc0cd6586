"""Tests of the chat (``{"messages": [...]}``) data format in :mod:`dropbp.app.data`.

Real tokenizers only: the byte-level tokenizer of ``tests/conftest.py`` with its ChatML
template, and the same tokenizer without a chat template for the plain format.
"""

from __future__ import annotations

import json

import pytest
from conftest import byte_tokenizer, data_load_error, tiny_llama

from dropbp.app.data import (
    IGNORE_INDEX,
    DataError,
    collate,
    exact_match_accuracy,
    generate_answers,
    heldout_loss,
    load_examples,
    prompt_token_ids,
    tokenize_example,
)

SYSTEM = {"role": "system", "content": "Answer with the number only."}
MULTI_TURN = [
    SYSTEM,
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And times 10?"},
    {"role": "assistant", "content": "40"},
]


@pytest.fixture(scope="module")
def chatml():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def plain():
    return byte_tokenizer(chat_template=None)


def _write(path, rows) -> str:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _chat(*messages, **extra) -> dict:
    return {"messages": list(messages), **extra}


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _trained_text(tokenizer, item) -> str:
    return tokenizer.decode([i for i, label in zip(item["input_ids"], item["labels"], strict=True) if label != IGNORE_INDEX])


# ------------------------------------------------------------------------ loading


def test_chat_line_is_normalised_and_keeps_its_keys(tmp_path):
    path = _write(tmp_path / "chat.jsonl", [_chat(*MULTI_TURN, id=7)])
    (example,) = load_examples(path)
    assert example["messages"] == MULTI_TURN  # the whole conversation, as written
    assert example["id"] == 7
    assert example["prompt"] == MULTI_TURN[:-1]  # the context: system + earlier turns
    assert example["response"] == "40"  # the last assistant message


def test_prompt_response_lines_are_returned_unchanged(tmp_path):
    rows = [{"prompt": "p", "response": "r", "messages": "kept as an extra key"}, {"prompt": "q", "response": "s"}]
    assert load_examples(_write(tmp_path / "pr.jsonl", rows)) == rows


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('["messages"]', 'line 2: expected a JSON object with "messages", got array'),
        ("{}", 'line 2: missing "messages"'),
        ('{"messages": "hi"}', 'line 2: "messages" must be a non-empty array'),
        ('{"messages": []}', ('line 2: "messages" must be a non-empty array of {"role": ..., "content": ...} objects, '
                             "got an empty array")),
        ('{"messages": {"role": "user"}}', '"messages" must be a non-empty array'),
        ('{"messages": ["hi", {"role": "assistant", "content": "a"}]}',
         'line 2: message 1 must be an object with "role" and "content", got string'),
        ('{"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}',
         'line 2: message 1 needs a string "role" (it is missing); use "system", "user" or "assistant"'),
        ('{"messages": [{"role": 1, "content": "q"}, {"role": "assistant", "content": "a"}]}',
         'message 1 needs a string "role" (got number)'),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
         'line 2: message 1 needs a string "content" (it is missing)'),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}',
         'message 2 needs a string "content" (got null)'),
        (('{"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}, '
         '{"role": "assistant", "content": "a"}]}'), 'message 1 needs a string "content" (got array)'),
        ('{"messages": [{"role": "tool", "content": "q"}, {"role": "assistant", "content": "a"}]}',
         'line 2: message 1 has unknown role "tool"; use "system", "user" or "assistant"'),
        ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}',
         "line 2: no assistant message"),
        (('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
         '{"role": "user", "content": "more?"}]}'),
         'line 2: the last message is from "user"; the last message must be the assistant\'s answer to train on'),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \\n "}]}',
         "line 2: the last (assistant) message is empty"),
        ('{"messages": [{"role": "assistant", "content": "a"}]}',
         "line 2: the conversation is only the assistant's answer; add the user message"),
    ],
)
def test_chat_validation_errors_name_file_line_and_fix(tmp_path, line, expected):
    path = _write(tmp_path / "chat.jsonl", [_chat(_user("q"), _assistant("a")), line])
    message = data_load_error(path)
    assert message.startswith(f"{path} line 2: ")
    assert expected in message


def test_earlier_turns_may_be_empty(tmp_path):
    path = _write(tmp_path / "chat.jsonl", [_chat(SYSTEM | {"content": ""}, _user("q"), _assistant("a"))])
    assert load_examples(path)[0]["response"] == "a"


def test_first_line_neither_format(tmp_path):
    with pytest.raises(DataError) as info:
        load_examples(_write(tmp_path / "x.jsonl", ['{"title": "hi"}']))
    assert 'line 1: missing "prompt" (give "prompt" and "response", or "messages" for the chat format)' in str(info.value)
    with pytest.raises(DataError, match='line 1: expected a JSON object with "prompt" and "response" or with "messages"'):
        load_examples(_write(tmp_path / "y.jsonl", ["[1]"]))


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            [{"prompt": "p", "response": "r"}, "", _chat(_user("q"), _assistant("a"))],
            ('line 3: a chat ("messages") example in a file of "prompt"/"response" examples (line 1 is one); '
            "use one format for every line of a file"),
        ),
        (
            ["", _chat(_user("q"), _assistant("a")), _chat(_user("q"), _assistant("a")), {"prompt": "p", "response": "r"}],
            ('line 4: a "prompt"/"response" example in a file of chat ("messages") examples (line 2 is one); '
            "use one format for every line of a file"),
        ),
    ],
)
def test_mixing_formats_in_one_file(tmp_path, rows, expected):
    path = _write(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert str(info.value) == f"{path} {expected}"


# ------------------------------------------------------------------------ tokenizing


@pytest.mark.parametrize("template", ["chatml", "plain"])
def test_single_turn_chat_equals_prompt_response(tmp_path, template, request):
    tokenizer = request.getfixturevalue(template)
    prompt, response = "What is 37 + 48? Answer with the number only.", "85"
    (chat,) = load_examples(_write(tmp_path / "c.jsonl", [_chat(_user(prompt), _assistant(response))]))
    (pair,) = load_examples(_write(tmp_path / "p.jsonl", [{"prompt": prompt, "response": response}]))
    assert chat["response"] == pair["response"]
    from_chat = tokenize_example(tokenizer, chat["prompt"], chat["response"], 256)
    from_pair = tokenize_example(tokenizer, pair["prompt"], pair["response"], 256)
    assert from_chat == from_pair
    assert prompt_token_ids(tokenizer, chat["prompt"]) == prompt_token_ids(tokenizer, prompt)


def test_multi_turn_loss_only_on_last_assistant_turn(chatml):
    context, response = MULTI_TURN[:-1], MULTI_TURN[-1]["content"]
    item = tokenize_example(chatml, context, response, 512)
    rendered = chatml.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
    n = len(chatml(rendered, add_special_tokens=False)["input_ids"])
    assert item["input_ids"][:n] == prompt_token_ids(chatml, context)
    assert item["labels"][:n] == [IGNORE_INDEX] * n  # system, user turns and the earlier answer "4"
    assert item["labels"][n:] == item["input_ids"][n:]
    assert _trained_text(chatml, item) == "40<|im_end|>"
    assert item["input_ids"][-1] == chatml.eos_token_id
    assert chatml.decode(item["input_ids"]) == rendered + "40<|im_end|>"
    assert "<|im_start|>assistant\n4<|im_end|>" in chatml.decode(item["input_ids"][:n])


def test_system_message_is_in_the_prompt(chatml):
    context = [SYSTEM, _user("What is 2 + 2?")]
    item = tokenize_example(chatml, context, "4", 256)
    n = len(prompt_token_ids(chatml, context))
    prompt_text = chatml.decode(item["input_ids"][:n])
    assert prompt_text.startswith("<|im_start|>system\nAnswer with the number only.<|im_end|>\n<|im_start|>user\n")
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert prompt_token_ids(chatml, context) != prompt_token_ids(chatml, "What is 2 + 2?")
    assert _trained_text(chatml, item) == "4<|im_end|>"


def test_plain_format_joins_turns_as_role_lines(plain):
    item = tokenize_example(plain, MULTI_TURN[:-1], "40", 512)
    assert plain.decode(item["input_ids"]) == (
        "system: Answer with the number only.\nuser: What is 2 + 2?\nassistant: 4\nuser: And times 10?\n"
        "assistant: 40<|im_end|>"
    )
    assert _trained_text(plain, item) == "40<|im_end|>"
    # A lone user turn keeps the prompt/response plain format.
    assert plain.decode(prompt_token_ids(plain, [_user("Q?")])) == "Q?\n"
    assert plain.decode(prompt_token_ids(plain, [SYSTEM, _user("Q?")])) == (
        "system: Answer with the number only.\nuser: Q?\nassistant: "
    )


def test_long_chat_context_is_rejected_like_a_long_prompt(chatml):
    n = len(prompt_token_ids(chatml, MULTI_TURN[:-1]))
    with pytest.raises(DataError, match=f"prompt alone is {n} tokens .* max_length={n}"):
        tokenize_example(chatml, MULTI_TURN[:-1], "40", n)


def test_malformed_prompt_messages_are_rejected(chatml):
    with pytest.raises(DataError, match='message 2 has unknown role "tool"'):
        tokenize_example(chatml, [_user("q"), {"role": "tool", "content": "x"}], "a", 64)
    with pytest.raises(DataError, match="a prompt must be a string or a list of chat messages"):
        prompt_token_ids(chatml, 5)


def test_chat_file_through_load_tokenize_collate(tmp_path, chatml):
    rows = [
        _chat(_user("What is 2 + 3?"), _assistant("5")),
        _chat(*MULTI_TURN),
        _chat(SYSTEM, _user("Sort: 3, 1, 2."), _assistant("1, 2, 3"), task="sorting"),
    ]
    examples = load_examples(_write(tmp_path / "train.jsonl", rows))
    items = [tokenize_example(chatml, e["prompt"], e["response"], 256) for e in examples]
    batch = collate(items, chatml.pad_token_id)
    width = max(len(item["input_ids"]) for item in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    for row, (item, example) in enumerate(zip(items, examples, strict=True)):
        n = len(item["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == item["input_ids"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        labels = batch["labels"][row].tolist()
        assert labels[n:] == [IGNORE_INDEX] * (width - n)
        kept = [t for t, label in zip(item["input_ids"], labels, strict=False) if label != IGNORE_INDEX]
        assert chatml.decode(kept) == example["response"] + "<|im_end|>"


# ------------------------------------------------------------------------ evaluation


def _model(tokenizer, seed=0):
    return tiny_llama(layers=2, seed=seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None, max_position_embeddings=512).eval()


def test_generation_and_loss_agree_across_formats(chatml):
    model = _model(chatml)
    prompt = "What is 2 + 2?"
    assert generate_answers(model, chatml, [[_user(prompt)]], max_new_tokens=5) == generate_answers(
        model, chatml, [prompt], max_new_tokens=5
    )
    chat = {"prompt": [_user(prompt)], "response": "4"}
    pair = {"prompt": prompt, "response": "4"}
    assert heldout_loss(model, chatml, [chat], max_length=128) == heldout_loss(model, chatml, [pair], max_length=128)


def test_exact_match_compares_with_the_last_assistant_message(tmp_path, chatml):
    model = _model(chatml, seed=3)
    context = MULTI_TURN[:-1]
    (prediction,) = generate_answers(model, chatml, [context], max_new_tokens=4)
    assert prediction.strip() and prediction.strip() != "4"  # the random model says something else than turn 3
    right = _chat(*context, _assistant(prediction))
    wrong = _chat(*context, _assistant(prediction + "x"))
    for rows, accuracy in [([right], 1.0), ([wrong], 0.0), ([right, wrong], 0.5)]:
        examples = load_examples(_write(tmp_path / "eval.jsonl", rows))
        assert exact_match_accuracy(model, chatml, examples, max_new_tokens=4) == accuracy
