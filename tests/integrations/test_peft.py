"""DropBP on PEFT-wrapped models: detection, gradients and unchanged adapter files."""

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import dropbp


def lora(model, targets):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], ["o_proj", "up_proj", "lm_head"]])
def test_adapter_keys_and_values_survive(tmp_path, batch, targets):
    plain = lora(tiny_llama(), targets)
    hooked = lora(tiny_llama(), targets)
    handle = dropbp.apply(hooked, drop_rate=0.5, seed=1)
    assert [b.name for b in handle.branches][:2] == [
        "base_model.model.model.layers.0.self_attn", "base_model.model.model.layers.0.mlp",
    ]
    hooked.train()
    optimizer = torch.optim.SGD([p for p in hooked.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        hooked(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    plain.save_pretrained(tmp_path / "plain")
    hooked.save_pretrained(tmp_path / "hooked")
    plain_keys = load_file(tmp_path / "plain" / "adapter_model.safetensors").keys()
    saved = load_file(tmp_path / "hooked" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(plain_keys)
    assert (tmp_path / "plain" / "adapter_config.json").read_text() == (
        tmp_path / "hooked" / "adapter_config.json").read_text()

    # The saved adapter reloads into a vanilla PeftModel and gives identical outputs.
    handle.remove()
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "hooked")
    hooked.eval(), reloaded.eval()
    assert torch.equal(hooked(batch).logits, reloaded(batch).logits)


def test_lora_gradients_follow_the_mask(batch):
    model = lora(tiny_llama(), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    handle = dropbp.apply(model, auto_step=False)
    mask = [True, False, False, True, True, False]
    handle.set_mask(mask)
    model.train()
    model(batch, labels=batch).loss.backward()
    for branch, dropped in zip(handle.branches, mask):
        params = [p for n, p in branch.module.named_parameters() if "lora_" in n]
        assert params and all((p.grad is None) == dropped for p in params), branch.name


def test_apply_to_base_model_is_found_from_the_wrapper(batch):
    base = tiny_llama()
    handle = dropbp.apply(base)
    wrapped = lora(base, ["q_proj"])
    assert dropbp.find_handle(wrapped) is handle
    wrapped.train()
    wrapped(batch, labels=batch).loss.backward()
    assert handle.step_count == 1
