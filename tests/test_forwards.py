"""Which training forward a branch call belongs to: where forwards start, what they draw, and
what they hand back when dropping cut their graph. Every gradient is compared against the
paper code's detach reference at the same mask."""

from __future__ import annotations

import copy

import io
import pickle

import pytest
import torch
from conftest import tiny_llama
from helpers import assert_same_grads, detach_reference_grads, parameter_grads

import dropbp
from dropbp.errors import DropBPError
from dropbp.masks import sample_mask

LAYERS = 2
NAMES = [f"model.layers.{i}.{b}" for i in range(LAYERS) for b in ("self_attn", "mlp")]


def lora(model, target_modules=None):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, init_lora_weights=False) if target_modules is None else \
        LoraConfig(r=4, target_modules=target_modules, init_lora_weights=False)
    return get_peft_model(model, config)  # None: PEFT's defaults for Llama (q_proj, v_proj: attention only)


def attention_only_lora():
    return lora(tiny_llama(layers=LAYERS))


def mlp_only_lora():
    return lora(tiny_llama(layers=LAYERS), ["gate_proj", "up_proj", "down_proj"])


def half_the_layers_frozen():
    model = tiny_llama(layers=LAYERS)
    for name, p in model.named_parameters():  # LISA-style: the embeddings and the lower layer frozen
        p.requires_grad_(not (name.startswith("model.embed_tokens") or name.startswith("model.layers.0.")))
    return model


def trainable_grads(model) -> dict[str, torch.Tensor | None]:
    return parameter_grads(model, trainable_only=True)


def assert_exact(got: dict, expected: dict) -> None:
    assert_same_grads(got, expected, rtol=1e-5, atol=1e-7)


SUBSETS = [attention_only_lora, mlp_only_lora, half_the_layers_frozen]


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


def causal_lm_loss(model, x):
    return model(input_ids=x, labels=x).loss


@pytest.mark.parametrize("drop_rate", [0.5, 0.875])
@pytest.mark.parametrize("build", SUBSETS, ids=lambda f: f.__name__)
def test_trainable_parameters_in_a_subset_of_the_branches_never_break_the_backward(build, drop_rate):
    """PEFT's default LoRA crashed ('element 0 of tensors does not require grad') in any step where every
    trainable branch was dropped but a branch without trainable parameters was kept."""
    model = build()
    model.train()
    handle = dropbp.apply(model, drop_rate=drop_rate, seed=0)
    x = batch()
    cut = 0
    for step in range(300):
        mask = sample_mask(0, step, handle.drop_rates)
        loss = causal_lm_loss(model, x)
        assert loss.requires_grad
        loss.backward()
        model.zero_grad(set_to_none=True)
        trainable = [any(p.requires_grad for p in b.parameters()) for b in handle.branches]
        cut += all(m for m, t in zip(mask, trainable) if t)
    assert handle.step_count == 300
    assert cut > 0  # the steps that used to fail were among them


@pytest.mark.parametrize("build", SUBSETS, ids=lambda f: f.__name__)
def test_gradients_equal_the_detach_reference_at_every_mask(build):
    """Every mask of 4 branches, so also each one where no trainable branch is kept."""
    model = build()
    model.train()
    handle = dropbp.apply(model, auto_step=False)
    x = batch()
    for code in range(2 ** len(handle.branches)):
        mask = [bool(code >> i & 1) for i in range(len(handle.branches))]
        handle.set_mask(mask)
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model, x).backward()
        assert_exact(trainable_grads(model), detach_reference_grads(model, mask, lambda m: causal_lm_loss(m, x)))


def test_an_hf_trainer_with_peft_default_lora_trains_at_a_high_drop_rate(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = attention_only_lora()
    rows = [{"input_ids": batch(seed)[0].tolist(), "labels": batch(seed)[0].tolist()} for seed in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=24, report_to=[],
                             save_strategy="no", logging_steps=100, use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      callbacks=[dropbp.DropBPCallback(drop_rate=0.875, max_rate=0.9)])
    trainer.train()
    assert trainer.state.global_step == 24


def decoder_loss(model, x):
    """Training through the decoder body, as distillation trainers and fused cross-entropy losses do."""
    body = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    return body(input_ids=x).last_hidden_state.pow(2).mean()


@pytest.mark.parametrize("peft", [False, True])
def test_training_through_the_decoder_draws_a_mask_per_forward(peft):
    model = tiny_llama(layers=LAYERS)
    if peft:
        model = lora(model, ["q_proj", "v_proj", "gate_proj"])
    model.train()
    handle = dropbp.apply(model, drop_rate=0.5, seed=5)
    x = batch()
    masks = []
    for step in range(6):
        mask = sample_mask(5, step, handle.drop_rates)
        masks.append(tuple(mask))
        model.zero_grad(set_to_none=True)
        decoder_loss(model, x).backward()
        assert handle.step_count == step + 1
        assert handle.mask == mask
        assert_exact(trainable_grads(model), detach_reference_grads(model, mask, lambda m: decoder_loss(m, x)))
    assert len(set(masks)) > 1
    # A forward of the whole model, with the decoder called inside it, is one forward: one mask.
    causal_lm_loss(model, x).backward()
    assert handle.step_count == 7


def test_the_model_left_by_merge_and_unload_draws_its_own_masks():
    model = lora(tiny_llama(layers=LAYERS), ["q_proj", "v_proj"])
    handle = dropbp.apply(model, drop_rate=0.5, seed=2)
    merged = model.merge_and_unload()
    merged.train()
    for p in merged.parameters():
        p.requires_grad_(True)
    x = batch()
    for step in range(4):
        mask = sample_mask(2, step, handle.drop_rates)
        merged.zero_grad(set_to_none=True)
        causal_lm_loss(merged, x).backward()
        assert handle.step_count == step + 1
        assert_exact(trainable_grads(merged), detach_reference_grads(merged, mask, lambda m: causal_lm_loss(m, x)))


def test_a_layer_called_directly_needs_the_caller_to_step_the_masks():
    model = tiny_llama(layers=LAYERS)
    model.train()
    handle = dropbp.apply(model, drop_rate=0.5)
    layer = model.model.layers[0]
    hidden = torch.randn(2, 8, 32)
    position = model.model.rotary_emb(hidden, torch.arange(8)[None])
    with pytest.raises(DropBPError, match="entered neither the model DropBP was applied to") as info:
        layer(hidden, position_embeddings=position)
    assert "\n" not in str(info.value)
    with torch.no_grad():  # nothing trains: nothing to decide
        layer(hidden, position_embeddings=position)

    handle.auto_step = False  # the caller steps the masks: the layer uses the mask in force
    handle.set_mask([True, False, False, False])
    layer(hidden, position_embeddings=position)[0].sum().backward()
    assert all(p.grad is None for p in layer.self_attn.parameters())
    assert all(p.grad is not None for p in layer.mlp.parameters())


def test_branches_in_eval_mode_inside_a_training_forward_are_refused():
    """Nothing would be dropped while drop_statistics reported the drop rate."""
    model = tiny_llama(layers=LAYERS)
    model.train()
    model.model.layers.eval()
    handle = dropbp.apply(model, drop_rate=0.5)
    x = batch()
    with pytest.raises(DropBPError, match="is in eval mode inside a training forward"):
        causal_lm_loss(model, x)
    assert torch.is_grad_enabled()
    with torch.no_grad():  # eval-like use of a training-mode root is fine
        causal_lm_loss(model, x)
    model.train()
    causal_lm_loss(model, x).backward()
    assert handle.drop_statistics()["steps"] >= 1


def test_pickle_and_torch_save_keep_dropbp_with_its_mask_stream():
    model = tiny_llama(layers=LAYERS)
    model.train()
    handle = dropbp.apply(model, drop_rate=0.5, seed=4)
    x = batch()
    causal_lm_loss(model, x).backward()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)]
    for other in copies:
        other_handle = dropbp.find_handle(other)
        assert other_handle is not handle and other_handle.model is other
        assert other_handle.state_dict() == handle.state_dict()
    for m in (model, *copies):
        m.zero_grad(set_to_none=True)
        causal_lm_loss(m, x).backward()
    for other in copies:
        assert dropbp.find_handle(other).step_count == handle.step_count == 2
        assert_exact(trainable_grads(other), trainable_grads(model))
        dropbp.find_handle(other).remove()
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in other.modules())


def test_the_engine_works_without_a_handle():
    """The layers below the handle are whole: a branch table, a mask stream, a FLOP meter and the routing, with the
    hooks registered by hand, drop exactly what the stream says (the detach reference at the same mask)."""
    from dropbp import hooks
    from dropbp.architectures import resolve_branches
    from dropbp.branches import BranchTable
    from dropbp.flops import FlopMeter
    from dropbp.forwards import Forwards
    from dropbp.masks import MaskStream
    from dropbp.reference import detach_branches

    model = tiny_llama()
    model.train()
    reference = copy.deepcopy(model)
    specs = resolve_branches(model, None)
    stream = MaskStream(len(specs), seed=3, rate=0.5)
    table = BranchTable(model, specs, stream)
    meter = FlopMeter(len(table), param_counts=[0] * len(table), names=[b.name for b in table.branches])
    routing = Forwards(model, table, stream, meter, draw=lambda: stream.advance()[1], auto_step=True, replay=True)
    removers = []
    for depth, module in enumerate(table.entry_modules):
        entry = hooks.EntryHook(routing, module, depth)
        removers += hooks.register(module, pre=entry.pre, post=entry.post)
    for module, indices in table.covers:
        removers += hooks.register(module, pre=hooks.KeyHook(routing, indices))
    for branch in table.branches:
        hook = hooks.BranchHook(routing, branch.index)
        removers += hooks.register(branch.module, pre=hook.pre)
        removers += hooks.register(branch.end_module, post=hook.post)

    x = batch()
    dropped = 0
    for step in range(3):  # each training forward draws the stream's next mask
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model, x).backward()
        assert stream.step == step + 1
        dropped += sum(stream.mask)
        reference.zero_grad(set_to_none=True)
        with detach_branches([reference.get_submodule(b.name) for b in table.branches], list(stream.mask)):
            causal_lm_loss(reference, x).backward()
        assert_exact(trainable_grads(model), trainable_grads(reference))
    assert dropped > 0 and all(f is not None for f in meter.flops) and dropbp.find_handle(model) is None
    for remover in removers:
        remover.remove()
