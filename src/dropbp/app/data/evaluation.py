"""Evaluation: exact-match accuracy of greedy answers, and the held-out loss."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from dropbp.app.data.loading import DataError, is_text_data
from dropbp.app.data.prompts import (
    IGNORE_INDEX,
    Prompt,
    pad_token_id,
    collate,
    prompt_token_ids,
    tokenize_examples,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "exact_match_accuracy",
    "generate_answers",
    "heldout_loss",
    "is_exact_match",
    "normalize_answer",
]

# The longest bundled response is 18 SmolLM2 tokens (a sorted list of five two-digit
# numbers); a smaller budget would cut correct answers short.
DEFAULT_MAX_NEW_TOKENS = 20

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
    pad_id = pad_token_id(tokenizer)
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
        DataError: If ``examples`` are text examples (nothing to compare the answers with).
    """
    if not examples:
        raise ValueError("exact_match_accuracy() needs at least one example")
    if is_text_data(examples):
        raise DataError("exact-match accuracy needs examples with a response to compare with; text examples "
                        "have none (their held-out loss is the measure)")
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
    """Mean cross-entropy per trained token over all ``examples``.

    The trained tokens are those :func:`dropbp.app.data.prompts.tokenize_examples` puts a
    label on: the response tokens and their EOS (for a chat example only the last assistant
    message), or every token of text examples. Every token counts the same (the mean is over
    tokens, not over batches). The model is put in eval mode and returned to its previous
    mode afterwards.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        examples: Examples as from :func:`dropbp.app.data.load_examples`.
        max_length: Most tokens per example or text block.
        batch_size: Sequences scored together.

    Returns:
        The mean loss per trained token.

    Raises:
        ValueError: If ``examples`` is empty or ``batch_size`` is below 1.
    """
    import torch
    import torch.nn.functional as F

    if not examples:
        raise ValueError("heldout_loss() needs at least one example")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pad_id = pad_token_id(tokenizer)
    device = _model_device(model)
    items = tokenize_examples(tokenizer, examples, max_length)
    total = 0.0
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                batch = collate(items[start : start + batch_size], pad_id)
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                targets = batch["labels"][:, 1:].to(device)
                keep = targets != IGNORE_INDEX  # score only the trained positions
                total += F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum").item()
                count += int(keep.sum())
    finally:
        model.train(was_training)
    return total / count
