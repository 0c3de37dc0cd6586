"""DropBP with QLoRA (bitsandbytes 4-bit NF4 base) and DoRA adapters through PEFT, and
``dropbp finetune --method qlora``. Tiny random-weight models saved to temp folders; no downloads."""

import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import dropbp
from dropbp.app.cli import main
from dropbp.app.models import LORA_TARGETS, load_model, prepare_for_training
from dropbp.reference import detach_branches

bnb = pytest.importorskip("bitsandbytes")

FORCED = [True, False, False, True, True, False]


def save_model_folder(folder, **overrides):
    """A tiny Llama and a byte-level ChatML tokenizer saved together as a local HF folder."""
    tokenizer = byte_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_folder(tmp_path_factory.mktemp("tiny-hf"))


def base_model(kind, folder):
    """The frozen base a variant trains on: 4-bit NF4 for the q* variants, fp32 otherwise."""
    if kind.startswith("q"):
        model, _ = load_model(folder, method="qlora")
        assert model.is_loaded_in_4bit
        return model
    model, _ = load_model(folder, method="lora")
    return model


def trainable(kind, folder):
    base = base_model(kind, folder)
    if kind == "qlora":  # the package's own QLoRA preparation
        return prepare_for_training(base, "qlora", lora_rank=4, lora_alpha=8)
    if kind == "qdora":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LORA_TARGETS), use_dora=True)
    return get_peft_model(base, config)


def lora_params(module):
    return {n: p for n, p in module.named_parameters() if "lora_" in n}


def assert_grads_follow(handle, mask):
    for branch, dropped in zip(handle.branches, mask):
        params = lora_params(branch.module)
        assert params, branch.name
        for name, p in params.items():
            assert (p.grad is None) == dropped, f"{branch.name}.{name} dropped={dropped}"


@pytest.mark.parametrize("kind", ["qlora", "dora", "qdora"])
def test_train_save_reload_and_reference_grads(model_dir, tmp_path, batch, kind):
    model = trainable(kind, model_dir)
    if kind.startswith("q"):
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and q_proj.base_layer.weight.dtype == torch.uint8
    if kind.endswith("dora"):
        assert any("lora_magnitude_vector" in n for n in lora_params(model))
    handle = dropbp.apply(model, drop_rate=0.5, seed=3)
    assert len(handle.branches) == 6
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen = []
    for _ in range(3):
        loss = model(batch, labels=batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        seen.append(handle.mask)  # the mask this forward sampled and used
        assert_grads_follow(handle, seen[-1])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert handle.step_count == 3
    assert any(any(m) for m in seen) and not all(all(m) for m in seen)  # both dropped and kept branches occurred

    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] == kind.endswith("dora")

    # A forced mask: gradients equal those of the paper's detach mechanism on an independent copy.
    handle.auto_step = False
    handle.set_mask(FORCED)
    model(batch, labels=batch).loss.backward()
    assert_grads_follow(handle, FORCED)
    got = {n: p.grad for n, p in lora_params(model).items()}
    assert any(g is not None and g.abs().sum() > 0 for g in got.values())
    handle.remove()
    model.zero_grad(set_to_none=True)

    reloaded = PeftModel.from_pretrained(base_model(kind, model_dir), adapter, is_trainable=True)
    reloaded.train()
    modules = [reloaded.get_submodule(b.name) for b in handle.branches]
    with detach_branches(modules, FORCED):
        reloaded(batch, labels=batch).loss.backward()
    expected = {n: p.grad for n, p in lora_params(reloaded).items()}
    assert expected.keys() == got.keys()
    for name, grad in expected.items():
        if grad is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)

    # The trained model (hooks removed) and a vanilla PeftModel from the saved adapter agree exactly.
    reloaded.zero_grad(set_to_none=True)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(batch).logits, reloaded(batch).logits)


# hidden 32: narrower than bitsandbytes' 64-value block (its CPU inference repacking crashed);
# hidden 64: the repacking worked and training after it got silently wrong gradients.
@pytest.mark.parametrize("hidden", [32, 64])
def test_evaluating_the_4bit_model_leaves_training_gradients_alone(model_dir, tmp_path, batch, hidden):
    """An eval forward must not switch bitsandbytes to its CPU inference kernel, which has no backward."""
    folder = model_dir if hidden == 32 else save_model_folder(tmp_path, hidden_size=64, intermediate_size=128)

    def grads(evaluate_first):
        torch.manual_seed(0)
        model = trainable("qlora", folder)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero, so that the lora_A weights get non-zero gradients too
                torch.nn.init.normal_(p, std=0.1)
        handle = dropbp.apply(model, auto_step=False)
        handle.set_mask(FORCED)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(batch)
        model.train()
        model(batch, labels=batch).loss.backward()
        handle.remove()
        return {n: p.grad for n, p in lora_params(model).items()}

    plain, after_eval = grads(False), grads(True)
    assert plain.keys() == after_eval.keys()
    for name, grad in plain.items():
        assert (grad is None) == (after_eval[name] is None), name
        assert grad is None or torch.equal(grad, after_eval[name]), name


def heldout(folder, adapter, four_bit, examples):
    from dropbp.app.data import heldout_loss

    model, tokenizer = load_model(folder, quantize_4bit=four_bit)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return heldout_loss(model, tokenizer, examples, max_length=64, batch_size=2)


def test_cli_finetune_qlora(model_dir, tmp_path, capsys):
    rows = [{"prompt": f"Add {i} and 1.", "response": str(i + 1)} for i in range(8)]
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in rows[6:]))
    out = tmp_path / "run"
    argv = ["finetune", "--method", "qlora", "--model", str(model_dir), "--data", str(train),
            "--eval-data", str(evaluation), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
            "--seq-len", "64", "--eval-size", "2", "--sensitivity-at", "0.5"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "run folder" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "summary.json", "adapter", "loss.png"}
    assert json.loads((out / "config.json").read_text())["method"] == "qlora"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[0].get("calibrated") is True
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sensitivities"] is not None and len(summary["drop_rates"]) == 6
    adapter = out / "adapter"
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert {k.split(".")[-3] for k in keys} == set(LORA_TARGETS)

    # The job trained on the 4-bit base: its held-out losses are those of the NF4 model
    # (before: the base alone, as fresh LoRA adds zero; after: base + the saved adapter).
    # The full-precision base scores differently (by ~2e-4 relative on this model).
    examples = [json.loads(line) for line in evaluation.read_text().splitlines()]
    before, after = summary["before"]["heldout_loss"], summary["after"]["heldout_loss"]
    assert before == pytest.approx(heldout(model_dir, None, True, examples), rel=1e-6, abs=0)
    assert after == pytest.approx(heldout(model_dir, adapter, True, examples), rel=1e-6, abs=0)
    assert before != pytest.approx(heldout(model_dir, None, False, examples), rel=2e-5, abs=0)
