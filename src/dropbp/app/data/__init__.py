"""Instruction data: the bundled data set, JSONL loading, tokenization and evaluation.

The package ships ``train.jsonl`` (2,400 examples) and ``heldout.jsonl`` (240 examples),
written deterministically by :mod:`dropbp.app.data.generate`. A user's own JSONL file goes
through the same functions; each file uses one of two formats on every line:

* prompt/response: ``{"prompt": "...", "response": "..."}``;
* chat (the Hugging Face messages format): ``{"messages": [{"role": "system" | "user" |
  "assistant", "content": "..."}, ...]}``. The training target is the last message, which
  must be the assistant's; every message before it is the context.

Importing this module needs only the standard library; torch and transformers are
imported inside the functions that use them.

Internal representation: an example is a dict with ``"prompt"`` (the context) and
``"response"`` (the answer to train on and to compare against in exact match). For a
prompt/response line the dict is the line's object unchanged, and its string prompt stands
for the single user turn ``[{"role": "user", "content": prompt}]``. A chat line keeps its
keys (``"messages"`` holds the whole conversation) and gains ``"prompt"``, the list of
messages before the last one, and ``"response"``, the content of the last (assistant)
message. Every function that takes a prompt accepts either form and turns it into the
same list of messages, so both formats share one tokenization path.

Prompt format: the context messages are rendered with the tokenizer's chat template with
``add_generation_prompt=True``; the response tokens follow, ended by the tokenizer's EOS
token (for SmolLM2 and other ChatML models that is ``<|im_end|>``, the template's end of
turn). Loss is taken only on the response tokens and that EOS, so in a multi-turn chat
example only the last assistant message is trained on. A tokenizer without a chat template
gets a plain format instead: a context of one user turn is ``prompt + "\\n"`` (the
response starts on the next line); any other context is one ``"role: content"`` line per
message followed by ``"assistant: "``, e.g. ``"system: Be brief.\\nuser: Hi\\nassistant: "``.
Training (:func:`tokenize_example`) and generation (:func:`generate_answers`) use the same
prompt tokens.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "IGNORE_INDEX",
    "SPLITS",
    "DataError",
    "bundled_data_path",
    "collate",
    "exact_match_accuracy",
    "generate_answers",
    "heldout_loss",
    "is_exact_match",
    "load_examples",
    "normalize_answer",
    "prompt_token_ids",
    "tokenize_example",
]

IGNORE_INDEX = -100
# The longest bundled response is 18 SmolLM2 tokens (a sorted list of five two-digit
# numbers); a smaller budget would cut correct answers short.
DEFAULT_MAX_NEW_TOKENS = 20
SPLITS = ("train", "heldout")
ROLES = ("system", "user", "assistant")

# A prompt is either a string (one user turn) or a list of chat messages.
Prompt = str | Sequence[Mapping[str, Any]]


class DataError(ValueError):
    """A data file or example is unusable. The message is a single line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# ----------------------------------------------------------------------------- files


def bundled_data_path(split: str) -> Path:
    """Path of the bundled ``"train"`` or ``"heldout"`` JSONL file."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(map(repr, SPLITS))}")
    return Path(__file__).resolve().parent / f"{split}.jsonl"


def load_examples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL file of prompt/response or chat examples (one format per file).

    A prompt/response line ``{"prompt": str, "response": str}`` is returned unchanged. A chat
    line ``{"messages": [{"role": ..., "content": ...}, ...]}`` is returned with its keys
    plus ``"prompt"`` (the messages before the last) and ``"response"`` (the content of the
    last message, which must be the assistant's); see the module docstring. Extra keys are
    kept. Blank lines are skipped. A UTF-8 byte-order mark is allowed.

    Args:
        path: The JSONL file.

    Returns:
        One example dict per non-blank line, in file order.

    Raises:
        DataError: With a one-line message naming the file and, for a bad line, its 1-based
            line number: ``data.jsonl line 17: invalid JSON (...)``,
            ``data.jsonl line 3: missing "response"``,
            ``... "prompt" must be a string, got number``, ``... "response" is empty``,
            ``... message 2 has unknown role "tool"; ...``, ``... the last message is from
            "user"; the last message must be the assistant's answer to train on ...``, a
            chat line in a prompt/response file or the reverse,
            ``data.jsonl: file not found``, ``data.jsonl: no examples (the file is empty)``.
    """
    name = os.fspath(path)
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a directory, not a JSONL file") from None
    except OSError as error:
        raise DataError(f"{name}: cannot read ({error.strerror or error})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]

    examples: list[dict[str, Any]] = []
    file_format: str | None = None  # "chat" or "prompt", set by the first example
    first_line = 0
    # Split on b"\n" only: JSON strings cannot hold a raw newline, but str.splitlines would
    # also split on characters such as U+2028 that may appear inside a JSON string.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{name} line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{where}: not valid UTF-8 (byte {error.start + 1})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(obj, dict):
            expected = {
                "prompt": 'with "prompt" and "response"',
                "chat": 'with "messages"',
                None: 'with "prompt" and "response" or with "messages"',
            }[file_format]
            raise DataError(f"{where}: expected a JSON object {expected}, got {_json_type(obj)}")
        line_format = _line_format(obj) or file_format
        if line_format is None:
            raise DataError(
                f'{where}: missing "prompt" (give "prompt" and "response", or "messages" for the chat format)'
            )
        if file_format is None:
            file_format, first_line = line_format, number
        elif line_format != file_format:
            kinds = {"chat": 'chat ("messages")', "prompt": '"prompt"/"response"'}
            raise DataError(
                f"{where}: a {kinds[line_format]} example in a file of {kinds[file_format]} examples "
                f"(line {first_line} is one); use one format for every line of a file"
            )
        examples.append(_chat_example(obj, where) if line_format == "chat" else _prompt_example(obj, where))
    if not examples:
        what = "the file is empty" if not data else "only blank lines"
        raise DataError(f"{name}: no examples ({what})")
    return examples


def _line_format(obj: Mapping[str, Any]) -> str | None:
    """``"prompt"`` if the object has a prompt/response key, ``"chat"`` if only ``"messages"``."""
    if "prompt" in obj or "response" in obj:
        return "prompt"
    if "messages" in obj:
        return "chat"
    return None


def _prompt_example(obj: dict[str, Any], where: str) -> dict[str, Any]:
    for key in ("prompt", "response"):
        if key not in obj:
            raise DataError(f'{where}: missing "{key}"')
        value = obj[key]
        if not isinstance(value, str):
            raise DataError(f'{where}: "{key}" must be a string, got {_json_type(value)}')
        if not value.strip():
            raise DataError(f'{where}: "{key}" is empty')
    return obj


def _chat_example(obj: dict[str, Any], where: str) -> dict[str, Any]:
    if "messages" not in obj:
        raise DataError(f'{where}: missing "messages" (a list of {{"role", "content"}} objects)')
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        got = "an empty array" if isinstance(messages, list) else _json_type(messages)
        raise DataError(
            f'{where}: "messages" must be a non-empty array of {{"role": ..., "content": ...}} objects, got {got}'
        )
    for index, message in enumerate(messages, start=1):
        problem = _message_problem(index, message)
        if problem:
            raise DataError(f"{where}: {problem}")
    last = messages[-1]
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f'{where}: no assistant message; end the conversation with {{"role": "assistant", "content": ...}}, '
            f"the answer to train on"
        )
    if last["role"] != "assistant":
        raise DataError(
            f'{where}: the last message is from "{last["role"]}"; the last message must be the assistant\'s '
            f"answer to train on (remove the messages after it or add the answer)"
        )
    if not last["content"].strip():
        raise DataError(f'{where}: the last (assistant) message is empty; give the answer to train on as its "content"')
    if len(messages) == 1:
        raise DataError(
            f"{where}: the conversation is only the assistant's answer; add the user message it answers before it"
        )
    return {**obj, "prompt": messages[:-1], "response": last["content"]}


def _message_problem(index: int, message: Any) -> str | None:
    """What is wrong with chat message number ``index`` (1-based), or None."""
    if not isinstance(message, Mapping):
        return f'message {index} must be an object with "role" and "content", got {_json_type(message)}'
    role = message.get("role")
    if not isinstance(role, str):
        got = "it is missing" if "role" not in message else f"got {_json_type(role)}"
        return f'message {index} needs a string "role" ({got}); use "system", "user" or "assistant"'
    if role not in ROLES:
        return f'message {index} has unknown role "{role}"; use "system", "user" or "assistant"'
    content = message.get("content")
    if not isinstance(content, str):
        got = "it is missing" if "content" not in message else f"got {_json_type(content)}"
        return f'message {index} needs a string "content" ({got}); give the message text as a string'
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --------------------------------------------------------------------------- answers

_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Canonical form of an answer for exact match.

    Strips surrounding whitespace, removes one trailing period (``"Paris."`` -> ``"Paris"``),
    collapses runs of whitespace into one space and case-folds. Nothing else changes:
    ``"7,19"`` and ``"7, 19"`` still differ.
    """
    text = text.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return _SPACES.sub(" ", text).casefold()


def is_exact_match(prediction: str, response: str) -> bool:
    """True when the two answers are equal after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(response)


# ------------------------------------------------------------------------ tokenizing


def _token_list(encoded: Any) -> list[int]:
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) or hasattr(encoded, "keys") else encoded
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


def _context_messages(prompt: Prompt) -> list[Mapping[str, Any]]:
    """The chat messages a prompt stands for: a string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, Sequence):
        raise DataError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    messages = list(prompt)
    for index, message in enumerate(messages, start=1):
        problem = _message_problem(index, message)
        if problem:
            raise DataError(f"bad prompt: {problem}")
    return messages


def _plain_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt text for a tokenizer without a chat template (see the module docstring)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"] + "\n"
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def prompt_token_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of ``prompt`` as the model sees it before its answer.

    With a chat template: the template applied to the context messages with the generation
    prompt (the special tokens come from the template, so no extra BOS is added). Without
    one: the plain format of the module docstring (``prompt + "\\n"`` for a single user
    turn), tokenized without special tokens.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompt: A string (one user turn) or a list of ``{"role", "content"}`` messages, the
            context before the answer (an example's ``"prompt"``).

    Returns:
        The prompt's token ids.

    Raises:
        DataError: If ``prompt`` is neither a string nor a list of valid chat messages.
    """
    messages = _context_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = _plain_prompt(messages)
    return _token_list(tokenizer(text, add_special_tokens=False))


def _end_token_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no EOS token to end the response with")
    return int(eos)


def _pad_token_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return 0 if pad is None else int(pad)


def tokenize_example(tokenizer: Any, prompt: Prompt, response: str, max_length: int) -> dict[str, list[int]]:
    """Tokenize one example for causal-LM fine-tuning with loss on the response only.

    ``input_ids`` is :func:`prompt_token_ids` followed by the response tokens and EOS;
    ``labels`` is ``-100`` on the prompt tokens (for a chat example: the system message and
    every earlier turn) and equals ``input_ids`` on the response tokens and EOS. Longer
    sequences are cut to ``max_length`` (dropping the end of the response).

    Args:
        tokenizer: A Hugging Face tokenizer with an EOS token.
        prompt: An example's ``"prompt"``: a string (one user turn) or the list of context
            messages of a chat example.
        response: An example's ``"response"``: the answer to train on.
        max_length: Most tokens kept, prompt included.

    Returns:
        Lists ``input_ids``, ``labels`` and ``attention_mask`` (no padding; see :func:`collate`).

    Raises:
        DataError: If ``max_length`` is below 2, the prompt leaves no room for a response
            token, the prompt is malformed, or the tokenizer has no EOS token.
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    if len(prompt_ids) >= max_length:
        raise DataError(
            f"the prompt alone is {len(prompt_ids)} tokens (chat template included) and does not fit in "
            f"max_length={max_length} with room for the response; raise max_length or shorten the prompt"
        )
    response_ids = _token_list(tokenizer(response, add_special_tokens=False))
    response_ids.append(_end_token_id(tokenizer))
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def collate(batch: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenized examples to the longest one and stack them into ``torch.long`` tensors.

    ``input_ids`` is padded with ``pad_token_id``, ``labels`` with ``-100`` and
    ``attention_mask`` with ``0``. Examples without ``labels`` or ``attention_mask`` get
    ``input_ids`` and all ones.
    """
    import torch

    if not batch:
        raise ValueError("collate() needs at least one example")
    width = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        ids = list(example["input_ids"])
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(list(example.get("labels", ids)), dtype=torch.long)
        attention_mask[row, :n] = torch.tensor(list(example.get("attention_mask", [1] * n)), dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# ------------------------------------------------------------------------ evaluation


def _model_device(model: Any) -> Any:
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers (``do_sample=False``) to ``prompts``, decoded from the new tokens only.

    Prompts are built by :func:`prompt_token_ids` and left-padded within each batch. The
    model is put in eval mode and returned to its previous mode afterwards.

    Args:
        model: A causal LM with ``generate``.
        tokenizer: Its tokenizer.
        prompts: Examples' ``"prompt"`` values: strings or lists of chat context messages.
        max_new_tokens: Most tokens generated per answer.
        batch_size: Prompts generated together.

    Returns:
        One decoded answer per prompt, special tokens removed.

    Raises:
        ValueError: If ``batch_size`` is below 1.
        DataError: If a prompt is malformed.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pad_id = _pad_token_id(tokenizer)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    device = _model_device(model)
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                encoded = [prompt_token_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
                width = max(len(ids) for ids in encoded)
                input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
                for row, ids in enumerate(encoded):
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, width - len(ids) :] = 1
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad_id,
                    eos_token_id=eos_id,
                )
                for row in output[:, width:].tolist():
                    answers.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers


def exact_match_accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
) -> float:
    """Fraction of ``examples`` whose greedy answer matches ``response`` (:func:`is_exact_match`).

    For a chat example the answer is compared with its last assistant message (its
    ``"response"`` as :func:`load_examples` sets it). Use :func:`generate_answers` to see the
    predictions themselves.

    Args:
        model: A causal LM with ``generate``.
        tokenizer: Its tokenizer.
        examples: Dicts with ``"prompt"`` and ``"response"``, as from :func:`load_examples`.
        max_new_tokens: Most tokens generated per answer.
        batch_size: Prompts generated together.

    Returns:
        The fraction of exact matches, from 0.0 to 1.0.

    Raises:
        ValueError: If ``examples`` is empty or ``batch_size`` is below 1.
    """
    if not examples:
        raise ValueError("exact_match_accuracy() needs at least one example")
    predictions = generate_answers(
        model, tokenizer, [e["prompt"] for e in examples], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    hits = sum(is_exact_match(p, e["response"]) for p, e in zip(predictions, examples, strict=True))
    return hits / len(examples)


def heldout_loss(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    max_length: int,
    batch_size: int = 16,
) -> float:
    """Mean cross-entropy per response token (EOS included) over all ``examples``.

    Every response token counts the same (the mean is over tokens, not over batches); for a
    chat example only the last assistant message and its EOS are scored. The model is put
    in eval mode and returned to its previous mode afterwards.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        examples: Dicts with ``"prompt"`` and ``"response"``, as from :func:`load_examples`.
        max_length: Most tokens per example (see :func:`tokenize_example`).
        batch_size: Examples scored together.

    Returns:
        The mean loss per response token.

    Raises:
        ValueError: If ``examples`` is empty or ``batch_size`` is below 1.
    """
    import torch
    import torch.nn.functional as F

    if not examples:
        raise ValueError("heldout_loss() needs at least one example")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pad_id = _pad_token_id(tokenizer)
    device = _model_device(model)
    total = 0.0
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                batch = collate(
                    [tokenize_example(tokenizer, e["prompt"], e["response"], max_length) for e in chunk], pad_id
                )
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                targets = batch["labels"][:, 1:].to(device)
                keep = targets != IGNORE_INDEX  # score only the response positions
                total += F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum").item()
                count += int(keep.sum())
    finally:
        model.train(was_training)
    return total / count
