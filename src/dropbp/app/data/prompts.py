"""Prompts and tokenization: the token ids the model trains on, and where the loss is.

An example's ``"prompt"`` (a string, one user turn, or a list of chat messages) is rendered with
the tokenizer's chat template with ``add_generation_prompt=True``; the response tokens follow,
ended by the tokenizer's EOS token (for SmolLM2 and other ChatML models that is
``<|im_end|>``, the template's end of turn). Loss is taken only on the response tokens and that
EOS, so in a multi-turn chat example only the last assistant message is trained on. A
tokenizer without a chat template gets a plain format instead: a context of one user turn is
``prompt + "\\n"`` (the response starts on the next line); any other context is one
``"role: content"`` line per message followed by ``"assistant: "``, e.g.
``"system: Be brief.\\nuser: Hi\\nassistant: "``. Training (:func:`tokenize_example`) and
generation (:func:`dropbp.app.data.evaluation.generate_answers`) use the same prompt tokens.

Text examples (``{"text": ...}``, continued pre-training) are packed instead
(:func:`pack_texts`): every document, ended by EOS, is concatenated into one stream that is cut
into blocks of the sequence length, as Hugging Face's ``run_clm`` example does; the loss is on
every token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dropbp.app.data.loading import DataError, is_text_data, message_problem

if TYPE_CHECKING:
    import torch

__all__ = [
    "IGNORE_INDEX",
    "collate",
    "pack_texts",
    "prompt_token_ids",
    "tokenize_example",
    "tokenize_examples",
]

IGNORE_INDEX = -100

# A prompt is either a string (one user turn) or a list of chat messages.
Prompt = str | Sequence[Mapping[str, Any]]


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
        problem = message_problem(index, message)
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


def pad_token_id(tokenizer: Any) -> int:
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


def pack_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[dict[str, list[int]]]:
    """Tokenize documents for continued pre-training: packed into blocks, loss on every token.

    Each document is tokenized with the tokenizer's special tokens (a BOS where it adds one)
    and ended by EOS; the documents are concatenated in order and the stream is cut into
    blocks of ``max_length`` tokens, so a long document spans several blocks and short ones
    share a block (attention crosses their EOS, as in Hugging Face's ``run_clm``). The last
    block may be shorter; a last block of one token is dropped (it predicts nothing).

    Args:
        tokenizer: A Hugging Face tokenizer with an EOS token.
        texts: The documents.
        max_length: Tokens per block.

    Returns:
        Lists ``input_ids``, ``labels`` (equal to ``input_ids``) and ``attention_mask`` per block.

    Raises:
        DataError: If ``max_length`` is below 2 or the tokenizer has no EOS token.
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    eos = _end_token_id(tokenizer)
    stream: list[int] = []
    for text in texts:
        ids = _token_list(tokenizer(text))
        if not ids or ids[-1] != eos:
            ids.append(eos)
        stream.extend(ids)
    blocks = [stream[start : start + max_length] for start in range(0, len(stream), max_length)]
    return [{"input_ids": b, "labels": list(b), "attention_mask": [1] * len(b)} for b in blocks if len(b) > 1]


def tokenize_examples(tokenizer: Any, examples: Sequence[Mapping[str, Any]], max_length: int
                      ) -> list[dict[str, list[int]]]:
    """Tokenize examples as :func:`dropbp.app.data.load_examples` returns them, whatever their format.

    Prompt/response and chat examples: one item each (:func:`tokenize_example`). Text examples:
    packed blocks (:func:`pack_texts`).

    Raises:
        DataError: As :func:`tokenize_example` or :func:`pack_texts`.
    """
    if is_text_data(examples):
        return pack_texts(tokenizer, [e["text"] for e in examples], max_length)
    return [tokenize_example(tokenizer, e["prompt"], e["response"], max_length) for e in examples]

