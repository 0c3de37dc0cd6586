"""DropBP inside TRL trainers beyond SFT: DPOTrainer, GRPOTrainer and RewardTrainer, each training a LoRA adapter.

Every model is a tiny random Llama (hidden 32, 2 layers: 4 branches) with the byte-level tokenizer, trained on CPU.
For each trainer one training batch is prepared the way the trainer prepares it (for GRPO that includes generating
the completions), and the gradients of the trainer's own loss (``trainer.compute_loss``) at a fixed mask are
compared with the paper's detach mechanism (:func:`dropbp.reference.detach_branches`). DPO and GRPO also run a
reference forward (adapter disabled, under ``no_grad``) that must neither sample a mask nor change anything.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama
from trainer_helpers import recording
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer

import dropbp
from dropbp import DropBPCallback
from dropbp.reference import detach_branches

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# 2 layers x (self_attn, mlp): drop layer 0's attention and layer 1's MLP, keep the other two.
MASK = [True, False, False, True]


# ----------------------------------------------------------------------------- models, data, configs
def tokenizer():
    return byte_tokenizer()


def causal_lm(tok):
    return tiny_llama(layers=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None, max_position_embeddings=256)


def reward_model(tok):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=256, attention_dropout=0.0,
                         num_labels=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return LlamaForSequenceClassification(config)


def lora(**overrides):
    # init_lora_weights=False: B is random too, so the adapter changes the model from the start (the DPO/GRPO
    # reference, the base model with the adapter disabled, differs from the policy) and both A and B get gradients.
    settings = dict(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, init_lora_weights=False)
    return LoraConfig(**{**settings, **overrides})


def preference_rows(n=8):
    return [{"prompt": [{"role": "user", "content": f"{i}+{i}?"}],
             "chosen": [{"role": "assistant", "content": str(2 * i)}],
             "rejected": [{"role": "assistant", "content": f"no {i}"}]} for i in range(n)]


def prompt_rows(n=8):
    return [{"prompt": [{"role": "user", "content": f"Say {i}."}]} for i in range(n)]


def text_reward(completions, **kwargs):
    """A deterministic reward that differs between (almost all) completions, so the advantages are not zero."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(sum(map(ord, t)) % 97) for t in texts]


def settings(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    return {**base, **overrides}


def exact(gradient_checkpointing):
    """Settings for the gradient comparisons: float32 (TRL defaults to bf16 autocast), checkpointing as asked."""
    return dict(bf16=False, gradient_checkpointing=gradient_checkpointing)


def dpo_trainer(tmp_path, callbacks=None, trainer_class=DPOTrainer, **overrides):
    tok = tokenizer()
    config = DPOConfig(**{**settings(tmp_path, max_length=64), **overrides})
    return trainer_class(model=causal_lm(tok), args=config, train_dataset=Dataset.from_list(preference_rows()),
                      processing_class=tok, peft_config=lora(), callbacks=callbacks)


def grpo_trainer(tmp_path, callbacks=None, trainer_class=GRPOTrainer, **overrides):
    tok = tokenizer()
    base = settings(tmp_path, per_device_train_batch_size=4, num_generations=2, max_completion_length=8, beta=0.1)
    config = GRPOConfig(**{**base, **overrides})
    return trainer_class(model=causal_lm(tok), reward_funcs=text_reward, args=config,
                       train_dataset=Dataset.from_list(prompt_rows()), processing_class=tok, peft_config=lora(),
                       callbacks=callbacks)


def reward_trainer(tmp_path, callbacks=None, trainer_class=RewardTrainer, **overrides):
    tok = tokenizer()
    config = RewardConfig(**{**settings(tmp_path, max_length=64), **overrides})
    return trainer_class(model=reward_model(tok), args=config, train_dataset=Dataset.from_list(preference_rows()),
                         processing_class=tok, peft_config=lora(task_type="SEQ_CLS", modules_to_save=["score"]),
                         callbacks=callbacks)


# ----------------------------------------------------------------------------- one step outside train()
def ready(trainer):
    """The model as ``train()`` leaves it for a step: training mode, checkpointing as configured."""
    model, args = trainer.model, trainer.args
    model.train()
    if args.activation_checkpointing:  # what Trainer.train does (TRL's gradient_checkpointing is its alias)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=args.activation_checkpointing_kwargs)
    # Set by train()'s loop; GRPO's loss normalisation reads it.
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return model


def prepare(trainer):
    """One training batch, prepared by the trainer (GRPO: generated, scored and run through the reference)."""
    ready(trainer)
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


class ForwardLog:
    """Calls of the model's forward, as (grad enabled, training) pairs."""

    def __init__(self, model):
        self.calls = []
        self._hook = model.register_forward_pre_hook(self.record)

    def record(self, module, args):
        self.calls.append((torch.is_grad_enabled(), module.training))

    def remove(self):
        self._hook.remove()


def loss_and_grads(trainer, inputs, before_backward=None):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(inputs))
    if before_backward is not None:
        before_backward()
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def check_against_detach_reference(trainer, inputs, mask=MASK):
    """Gradients of ``trainer.compute_loss`` with DropBP at ``mask`` equal those of the detach reference."""
    model = trainer.model
    handle = dropbp.apply(model, auto_step=False)
    assert len(handle.branches) == len(mask)
    handle.set_mask(mask)
    kept = []
    loss, got = loss_and_grads(trainer, inputs, lambda: kept.append(handle.kept_for_replay))
    # Under checkpointing, a dropped attention whose MLP is kept (MASK's layer 0) is recomputed in backward, and its
    # output waits for that recompute: the replay path is exercised. The backward consumed it.
    assert (sum(kept[0]) > 0) == bool(trainer.args.activation_checkpointing)
    assert handle.kept_for_replay == [0] * len(mask)
    with handle.paused(), detach_branches([b.module for b in handle.branches], mask):
        expected_loss, expected = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss)
    assert torch.equal(loss, expected_loss)  # the forward is exact, reference forward included
    assert got.keys() == expected.keys() and got
    for name, grad in expected.items():
        if grad is None:
            assert got[name] is None or not got[name].any(), name
        else:
            assert got[name] is not None, name
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for branch, dropped in zip(handle.branches, mask):
        adapters = [(n, p) for n, p in branch.module.named_parameters() if "lora_" in n and p.requires_grad]
        assert adapters, branch.name
        for name, param in adapters:
            if dropped:
                assert param.grad is None or not param.grad.any(), f"{branch.name}.{name}"
            else:
                assert param.grad is not None and param.grad.abs().sum() > 0, f"{branch.name}.{name}"
    # Parameters outside the branches (the other branches' adapters, the reward head) still learn.
    assert any(g is not None and g.abs().sum() > 0 for g in got.values())
    return handle


# ----------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_dpo_gradients_match_the_detach_reference(tmp_path, gradient_checkpointing):
    trainer = dpo_trainer(tmp_path, **exact(gradient_checkpointing))
    assert trainer.ref_model is None  # the reference is the model itself with the adapter disabled
    inputs = prepare(trainer)
    check_against_detach_reference(trainer, inputs)


def test_dpo_reference_forward_samples_no_mask(tmp_path):
    """One compute_loss: one training forward (chosen and rejected concatenated) and one no-grad reference forward.

    With auto_step on, only the training forward samples a mask, and its gradients are those of the detach
    reference at that mask.
    """
    trainer = dpo_trainer(tmp_path, **exact(False))
    inputs = prepare(trainer)
    model = trainer.model
    plain_loss, _ = loss_and_grads(trainer, inputs)

    handle = dropbp.apply(model, drop_rate=0.5, seed=5)  # auto_step: every training forward samples a mask
    log = ForwardLog(model)
    loss, got = loss_and_grads(trainer, inputs)
    log.remove()
    assert log.calls == [(True, True), (False, True)]  # policy (training), then reference (no_grad, train mode)
    assert handle.step_count == 1  # the reference forward sampled nothing
    mask = handle.mask
    assert mask == dropbp.sample_mask(5, 0, [0.5] * 4) and any(mask) and not all(mask)
    assert torch.equal(loss, plain_loss)
    with handle.paused(), detach_branches([b.module for b in handle.branches], mask):
        expected_loss, expected = loss_and_grads(trainer, inputs)
    assert handle.step_count == 1
    assert torch.equal(loss, expected_loss)
    for name, grad in expected.items():
        if grad is None:
            assert got[name] is None or not got[name].any(), name
        else:
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- GRPO
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_grpo_gradients_match_the_detach_reference(tmp_path, gradient_checkpointing):
    trainer = grpo_trainer(tmp_path, **exact(gradient_checkpointing))
    inputs = prepare(trainer)  # generates 2 completions for each of 2 prompts, scores them, runs the reference
    assert inputs["completion_ids"].shape[0] == 4 and "ref_per_token_logps" in inputs
    assert inputs["advantages"].abs().sum() > 0  # else the policy loss has no gradient to compare
    check_against_detach_reference(trainer, inputs)


def test_grpo_generation_is_unchanged_by_dropbp(tmp_path):
    """Generate, train a micro-batch (forward and backward), generate again: the same tokens with DropBP as without."""
    trainer = grpo_trainer(tmp_path, **exact(False))
    model = ready(trainer)
    batches = iter(trainer.get_train_dataloader())
    first, second = next(batches), next(batches)

    def rollout():
        torch.manual_seed(1234)
        generated = trainer._prepare_inputs(first)
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(generated))
        loss.backward()
        regenerated = trainer._prepare_inputs(second)  # trainer._step is still 0: it generates again
        return generated, loss.detach(), regenerated

    handle = dropbp.apply(model, drop_rate=0.5, seed=3)
    log = ForwardLog(model)
    with_dropbp = rollout()
    log.remove()
    # Per micro-batch: one no-grad reference forward in each _prepare_inputs (generate calls the base model, not the
    # PeftModel the hooks' root is on) and one training forward in compute_loss; only the latter samples a mask.
    assert log.calls == [(False, True), (True, True), (False, True)]
    assert handle.step_count == 1 and any(handle.mask)
    handle.remove()
    without = rollout()

    for got, expected in ((with_dropbp[0], without[0]), (with_dropbp[2], without[2])):
        assert got.keys() == expected.keys()
        for key in ("prompt_ids", "completion_ids", "completion_mask", "advantages", "ref_per_token_logps"):
            assert torch.equal(got[key], expected[key]), key
    assert torch.equal(with_dropbp[1], without[1])


def test_generate_in_train_mode_is_unchanged_by_dropbp():
    tok = tokenizer()
    model = causal_lm(tok)
    model.train()
    prompt = tok(["<|im_start|>user\nHi<|im_end|>\n", "<|im_start|>user\n12<|im_end|>\n"], return_tensors="pt")

    def sample():
        torch.manual_seed(7)
        return model.generate(**prompt, do_sample=True, max_new_tokens=8, pad_token_id=tok.pad_token_id)

    expected = sample()
    handle = dropbp.apply(model, drop_rate=0.5)
    got = sample()
    assert torch.equal(got, expected)
    assert handle.step_count == 0 and model.training


# ----------------------------------------------------------------------------- RewardTrainer
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_reward_gradients_match_the_detach_reference(tmp_path, gradient_checkpointing):
    trainer = reward_trainer(tmp_path, **exact(gradient_checkpointing))
    inputs = prepare(trainer)
    assert inputs["input_ids"].shape[0] == 4  # 2 chosen, then 2 rejected
    handle = check_against_detach_reference(trainer, inputs)
    score = [p for n, p in trainer.model.named_parameters() if "score" in n and p.requires_grad]
    assert score and all(p.grad is not None and p.grad.abs().sum() > 0 for p in score)
    assert handle.branches[0].name == "base_model.model.model.layers.0.self_attn"  # inside the SEQ_CLS PeftModel


# ----------------------------------------------------------------------------- short runs with the defaults
def check_short_run(trainer, steps):
    assert trainer.args.activation_checkpointing and trainer.args.bf16  # TRL's defaults: checkpointing, bf16 autocast
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, DropBPCallback))
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == steps
    assert all("dropbp/drop_rate" in e for e in logged)
    assert all(math.isfinite(e["loss"]) for e in logged)
    # 4 branches at rate 0.5: each mask drops exactly 2, so a logged 0.5 also shows that every step sampled one.
    assert all(e["dropbp/drop_rate"] == 0.5 for e in logged)
    # One mask per optimizer step (no gradient accumulation): no-grad reference forwards and generation sample none.
    assert callback.handle.step_count == steps
    assert trainer.state.global_step == steps


def test_dpo_short_run_with_the_callback(tmp_path):
    trainer = dpo_trainer(tmp_path, callbacks=[DropBPCallback()], max_steps=2)
    check_short_run(trainer, 2)


def test_grpo_short_run_with_the_callback(tmp_path):
    trainer = grpo_trainer(tmp_path, callbacks=[DropBPCallback()], max_steps=2)
    check_short_run(trainer, 2)


def test_reward_short_run_with_the_callback(tmp_path):
    trainer = reward_trainer(tmp_path, callbacks=[DropBPCallback()], max_steps=2)
    check_short_run(trainer, 2)


# ----------------------------------------------------------------------------- sensitivity on the trained objective
@pytest.mark.parametrize(("build", "trainer_class"), [(dpo_trainer, DPOTrainer), (grpo_trainer, GRPOTrainer),
                                                      (reward_trainer, RewardTrainer)], ids=["dpo", "grpo", "reward"])
@pytest.mark.parametrize("examples", [None, 1])
def test_sensitivity_is_measured_on_the_trainers_own_loss(tmp_path, build, trainer_class, examples):
    # sensitivity_examples=1 (the default) does not cut these batches: their rows need not be examples
    # (RewardTrainer stacks chosen above rejected), so the whole recorded batch is measured either way.
    callback = DropBPCallback(drop_rate=0.5, sensitivity_at=0.5, sensitivity_examples=examples)
    # learning_rate 0: the measurement after step 1 sees the weights step 1's loss was computed with
    trainer = build(tmp_path, callbacks=[callback], trainer_class=recording(trainer_class), bf16=False,
                    learning_rate=0.0)
    trainer.train()
    # Step 1 trains on a batch (call 0); after it the measurement computes the same objective on that batch
    # (call 1); step 2 trains (call 2). The mask only changes the backward, so the values are equal.
    losses = trainer.losses_seen
    assert len(losses) == 3
    assert callback.sensitivity_losses == [pytest.approx(losses[0], rel=1e-6)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert all(s > 0 for s in callback.handle.sensitivities)
    assert len(set(callback.handle.drop_rates)) > 1
    assert callback.handle.dropped_flops_fraction() == pytest.approx(0.5, abs=0.02)
    # What the measurement's compute_loss logged (TRL's rewards, accuracies, ...) was discarded: every log
    # averages exactly the one training step before it.
    assert trainer.metric_counts and all(set(counts.values()) <= {1} for counts in trainer.metric_counts)



def test_a_train_that_raised_leaves_no_second_recorder(tmp_path):
    from transformers import TrainerCallback

    class StopAtFirstStep(TrainerCallback):
        armed = True

        def on_step_end(self, args, state, control, **kwargs):
            if self.armed:
                self.armed = False
                raise KeyboardInterrupt  # before the measurement at step 2: on_train_end never runs

    callback = DropBPCallback(drop_rate=0.5, sensitivity_at=0.5, sensitivity_batches=2)
    trainer = reward_trainer(tmp_path, callbacks=[callback, StopAtFirstStep()], bf16=False, max_steps=4,
                             learning_rate=0.0)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.train()
    # One recorder: the two measured batches are steps 1 and 2 of the second run, not one batch recorded twice.
    losses = callback.sensitivity_losses
    assert len(losses) == 2 and losses[0] != losses[1]
    assert "compute_loss" not in vars(trainer)
