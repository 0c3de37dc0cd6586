"""Model loading: local folders, errors, and the bundled SmolLM2 (slow)."""

import math

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama
from helpers import hub_cache, run_cli

import dropbp
from dropbp.app.models import (
    ModelError,
    bundled_model_folder,
    load_model,
    max_positions,
    prepare_for_training,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = byte_tokenizer()
    tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=200).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_folder_loads_with_pad_token(model_dir):
    model, tokenizer = load_model(model_dir)
    assert model.config.model_type == "llama" and tokenizer.pad_token is not None
    assert max_positions(model_dir) == 200


def test_missing_and_non_model_folders(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelError, match="neither config.json nor a .gguf"):
        load_model(tmp_path)


@pytest.mark.parametrize("method, trainable", [("full", "all"), ("lora", "lora_")])
def test_prepare_for_training(model_dir, method, trainable):
    model, _ = load_model(model_dir)
    model = prepare_for_training(model, method)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable == "all":
        assert len(names) == len(list(model.parameters()))
    else:
        assert names and all("lora_" in n for n in names)
    with pytest.raises(ValueError, match="method"):
        prepare_for_training(model, "prefix")


@pytest.mark.slow
def test_bundled_smollm2_trains_two_dropbp_steps():
    assert (bundled_model_folder() / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    model, tokenizer = load_model()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    # dequantized on load: plain fp32 weights that the HF Trainer accepts
    assert getattr(model, "hf_quantizer", None) is None and model.dtype == torch.float32
    model = prepare_for_training(model, "lora")
    handle = dropbp.apply(model, drop_rate=0.5, seed=0)
    assert len(handle.branches) == 60
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    batch = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"], "labels": ids["input_ids"]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        for branch, dropped in zip(handle.branches, handle.mask):
            lora = [p for n, p in branch.module.named_parameters() if "lora_" in n]
            assert lora and all((p.grad is None) == dropped for p in lora), branch.name
        optimizer.step()
        optimizer.zero_grad()
        assert math.isfinite(loss.item())
    assert handle.step_count == 2 and 20 <= sum(handle.mask) <= 40


@pytest.mark.slow
def test_bundled_smollm2_loads_in_4bit_for_qlora():
    import bitsandbytes as bnb

    from dropbp.app.models import load_weights

    # The GGUF weights are dequantized, saved and loaded again in NF4: save_pretrained refused a
    # model still marked GGUF-quantized, so `dropbp finetune --method qlora` failed on the default model.
    model = prepare_for_training(load_weights(None, four_bit=True), "qlora")
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 30 * 7  # q, k, v, o, gate, up, down in every layer
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_a_hub_id_loads_from_the_hugging_face_cache(tmp_path):
    root = hub_cache(tmp_path / "hf")
    out = tmp_path / "run"
    result = run_cli(root, "-m", "dropbp.app.cli", "finetune", "--model", "tiny-org/tiny-chat", "--output-dir", str(out),
                     "--max-steps", "2", "--batch-size", "2", "--seq-len", "160", "--eval-size", "2", "--eval-every", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "adapter" / "adapter_config.json").is_file()
    layers = run_cli(root, "-c", "from dropbp.app.models import load_config as c; "
                                 "print(c('tiny-org/tiny-chat').num_hidden_layers, c('tiny-org/tiny-chat', 'v1')"
                                 ".num_hidden_layers)")
    assert layers.stdout.split() == ["2", "3"], layers.stderr[-2000:]


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_id_that_is_not_cached_is_a_one_line_error(tmp_path, offline):
    root = hub_cache(tmp_path / "hf")
    result = run_cli(root, "-m", "dropbp.app.cli", "finetune", "--model", "tiny-org/not-there", "--output-dir",
                     str(tmp_path / "run"), offline=offline)
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()[-1]
    assert "'tiny-org/not-there'" in err and "hf download tiny-org/not-there" in err, err
    if offline:
        assert "HF_HUB_OFFLINE=1" in err
    assert not (tmp_path / "run").exists()
