"""Test helpers: a tiny random Llama, a byte-level tokenizer and a chat-model folder on disk.

For tests, examples and the ``--quick`` benchmarks (as ``accelerate.test_utils`` is for Accelerate);
the library itself never imports this module. Tiny copies of any architecture, which
``dropbp check`` needs, are :func:`dropbp.tiny.tiny_causal_lm`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHATML", "byte_tokenizer", "save_tiny_chat_model", "tiny_llama"]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llama(layers: int = 3, seed: int = 0, **overrides: Any) -> "PreTrainedModel":
    """A random-weight Llama causal LM with grouped-query attention and a gated MLP (hidden 32).

    Args:
        layers: Decoder layers.
        seed: Seeds ``torch.manual_seed`` before the weights are initialised.
        **overrides: ``LlamaConfig`` fields that replace the tiny defaults.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=layers, vocab_size=64, max_position_embeddings=128, attention_dropout=0.0)
    return LlamaForCausalLM(LlamaConfig(**{**settings, **overrides}))


def byte_tokenizer(chat_template: str | None = CHATML) -> Any:
    """A byte-level tokenizer without merges (every byte a token), pad and end tokens, and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<pad>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>")
    tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_chat_model(folder: str | os.PathLike[str], layers: int = 2, max_positions: int = 256) -> Path:
    """Save a random :func:`tiny_llama` with the :func:`byte_tokenizer` as a Hugging Face folder.

    What ``dropbp finetune --model`` and the ``--quick`` benchmarks run on when the real model would be too slow.

    Returns:
        The folder.
    """
    folder = Path(folder)
    tokenizer = byte_tokenizer()
    model = tiny_llama(layers=layers, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None, max_position_embeddings=max_positions)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
