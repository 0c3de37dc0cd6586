"""Shared fixtures: tiny random-weight models built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(layers: int = 3, seed: int = 0, **overrides):
    """A Llama-architecture causal LM with grouped-query attention and a gated MLP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=layers,
        vocab_size=64,
        max_position_embeddings=128,
        attention_dropout=0.0,
    )
    config = LlamaConfig(**{**settings, **overrides})
    return LlamaForCausalLM(config)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (2, 12), generator=generator)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(chat_template: str | None = CHATML):
    """A byte-level tokenizer without merges (every byte a token) and a ChatML template."""
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


def data_load_error(path) -> str:
    """The message of the DataError that loading ``path`` raises; it must be one line and a ValueError."""
    from dropbp.app.data import DataError, load_examples

    with pytest.raises(DataError) as info:
        load_examples(path)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A 2-layer random Llama with the byte-level ChatML tokenizer, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = byte_tokenizer()
    model = tiny_llama(layers=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None, max_position_embeddings=256)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
