"""Shared fixtures: tiny random-weight models built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch

from dropbp.testing import CHATML, byte_tokenizer, save_tiny_chat_model, tiny_llama

__all__ = ["CHATML", "byte_tokenizer", "data_load_error", "tiny_llama"]


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (2, 12), generator=generator)


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
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-model"))
