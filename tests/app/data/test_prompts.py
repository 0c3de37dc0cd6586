"""Text examples (continued pre-training): packing into blocks, loss on every token, and the held-out loss
over them, checked against a direct computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dropbp.app.data import (
    DataError,
    collate,
    exact_match_accuracy,
    heldout_loss,
    pack_texts,
    tokenize_example,
    tokenize_examples,
)
from dropbp.testing import byte_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_documents_end_with_eos_and_are_cut_into_blocks(tokenizer):
    eos = tokenizer.eos_token_id
    texts = ["abcdefghij", "xyz", "0123456789abcdef"]
    blocks = pack_texts(tokenizer, texts, max_length=8)
    stream = [t for b in blocks for t in b["input_ids"]]
    expected = []
    for text in texts:
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    assert stream == expected  # nothing lost, nothing added but one EOS per document, order kept
    assert len(expected) == 32 and [len(b["input_ids"]) for b in blocks] == [8, 8, 8, 8]
    for block in blocks:
        assert block["labels"] == block["input_ids"]  # the loss is on every token
        assert block["attention_mask"] == [1] * len(block["input_ids"])


def test_a_last_block_of_one_token_is_dropped(tokenizer):
    # 7 byte tokens + EOS = 8, then one more token would predict nothing on its own
    assert [len(b["input_ids"]) for b in pack_texts(tokenizer, ["abcdefg"], max_length=4)] == [4, 4]
    assert [len(b["input_ids"]) for b in pack_texts(tokenizer, ["abcdefgh"], max_length=4)] == [4, 4]
    with pytest.raises(DataError, match="max_length must be at least 2"):
        pack_texts(tokenizer, ["a"], max_length=1)


def test_tokenize_examples_dispatches_on_the_format(tokenizer):
    prompt_examples = [{"prompt": "2+2?", "response": "4"}, {"prompt": "3+3?", "response": "6"}]
    assert tokenize_examples(tokenizer, prompt_examples, 64) == [
        tokenize_example(tokenizer, e["prompt"], e["response"], 64) for e in prompt_examples]
    text_examples = [{"text": "hello world"}, {"text": "bye"}]
    assert tokenize_examples(tokenizer, text_examples, 5) == pack_texts(tokenizer, ["hello world", "bye"], 5)


def test_heldout_loss_of_text_is_the_mean_over_every_predicted_token(tokenizer):
    model = tiny_llama(layers=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    examples = [{"text": "The quick brown fox."}, {"text": "Jumps over the lazy dog, twice over."}]
    blocks = pack_texts(tokenizer, [e["text"] for e in examples], 16)
    with torch.no_grad():
        total, count = 0.0, 0
        for block in blocks:  # one at a time, unpadded: the reference
            ids = torch.tensor([block["input_ids"]])
            logits = model(input_ids=ids).logits
            total += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    assert heldout_loss(model, tokenizer, examples, max_length=16, batch_size=3) == pytest.approx(total / count,
                                                                                                   rel=1e-5)
    batch = collate(blocks, tokenizer.pad_token_id)
    assert int((batch["labels"] != -100).sum()) == sum(len(b["input_ids"]) for b in blocks)
    with pytest.raises(DataError, match="exact-match accuracy needs examples with a response"):
        exact_match_accuracy(model, tokenizer, examples)
