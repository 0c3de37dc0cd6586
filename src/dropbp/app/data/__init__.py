"""Instruction data: the bundled data set, JSONL loading, tokenization and evaluation.

The package ships ``train.jsonl`` (2,400 examples) and ``heldout.jsonl`` (240 examples),
written deterministically by :mod:`dropbp.app.data.generate`. A user's own JSONL file of
``{"prompt": ..., "response": ...}`` objects goes through the same functions.

Importing this module needs only the standard library; torch and transformers are
imported inside the functions that use them.

Prompt format: the prompt is rendered with the tokenizer's chat template as a single user
turn, ``[{"role": "user", "content": prompt}]``, with ``add_generation_prompt=True``; the
response tokens follow, ended by the tokenizer's EOS token (for SmolLM2 and other ChatML
models that is ``<|im_end|>``, the template's end of turn). Loss is taken only on the
response tokens and that EOS. A tokenizer without a chat template gets the plain format
``prompt + "\\n"`` instead. Training (:func:`tokenize_example`) and generation
(:func:`generate_answers`) use the same prompt tokens.
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
    """Read a JSONL file of ``{"prompt": str, "response": str}`` objects.

    Extra keys are kept. Blank lines are skipped. A UTF-8 byte-order mark is allowed.
    Any problem raises :class:`DataError` with a one-line message naming the file and, for
    a bad line, its 1-based line number: ``data.jsonl line 17: invalid JSON (...)``,
    ``data.jsonl line 3: missing "response"``, ``... "prompt" must be a string, got int``,
    ``... "response" is empty``, ``data.jsonl: file not found``,
    ``data.jsonl: no examples (the file is empty)``.
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
            raise DataError(
                f'{where}: expected a JSON object with "prompt" and "response", got {_json_type(obj)}'
            )
        for key in ("prompt", "response"):
            if key not in obj:
                raise DataError(f'{where}: missing "{key}"')
            value = obj[key]
            if not isinstance(value, str):
                raise DataError(f'{where}: "{key}" must be a string, got {_json_type(value)}')
            if not value.strip():
                raise DataError(f'{where}: "{key}" is empty')
        examples.append(obj)
    if not examples:
        what = "the file is empty" if not data else "only blank lines"
        raise DataError(f"{name}: no examples ({what})")
    return examples


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


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as the model sees it before its answer.

    With a chat template: the template applied to one user turn with the generation prompt
    (the special tokens come from the template, so no extra BOS is added). Without one:
    ``prompt + "\\n"`` tokenized without special tokens.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = prompt + "\n"
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


def tokenize_example(tokenizer: Any, prompt: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Tokenize one example for causal-LM fine-tuning with loss on the response only.

    Returns lists ``input_ids``, ``labels`` and ``attention_mask`` (no padding; see
    :func:`collate`). ``input_ids`` is :func:`prompt_token_ids` followed by the response
    tokens and EOS; ``labels`` is ``-100`` on the prompt tokens and equals ``input_ids`` on
    the response tokens and EOS. Longer sequences are cut to ``max_length`` (dropping the
    end of the response); a prompt that leaves no room for a response token raises
    :class:`DataError`.
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
    prompts: Sequence[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers (``do_sample=False``) to ``prompts``, decoded from the new tokens only.

    Prompts are built by :func:`prompt_token_ids` and left-padded within each batch. The
    model is put in eval mode and returned to its previous mode afterwards.
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

    Use :func:`generate_answers` to see the predictions themselves.
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

    Every response token counts the same (the mean is over tokens, not over batches). The
    model is put in eval mode and returned to its previous mode afterwards.
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
