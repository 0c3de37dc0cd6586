"""DropBPCallback inside a real transformers Trainer and a real TRL SFTTrainer."""

import subprocess
import sys

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama
from trainer_helpers import MaskLog, StopAt, TokenData, recording, training_args
from transformers import Trainer, TrainerCallback

import dropbp
from dropbp import DropBPCallback


def test_trainer_applies_measures_allocates_and_logs(tmp_path):
    model = tiny_llama()
    masks = MaskLog(model)
    callback = DropBPCallback(drop_rate=0.5, sensitivity_at=0.5, sensitivity_batches=2)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenData(), callbacks=[callback])
    trainer.train()
    handle = dropbp.find_handle(model)
    assert handle is callback.handle
    # gradient accumulation: one mask per micro-batch
    assert handle.step_count == 6 * 2 == len(masks.masks)
    assert handle.sensitivities is not None and len(handle.sensitivities) == 6
    assert handle.drop_rates != [0.5] * 6
    assert handle.dropped_flops_fraction() == pytest.approx(0.5)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 6
    assert all(0.0 <= e["dropbp/drop_rate"] < 1.0 for e in logged)
    assert all(0.0 <= e["dropbp/backward_flops_skipped"] < 1.0 for e in logged)
    mean = sum(e["dropbp/backward_flops_skipped"] for e in logged) / len(logged)
    assert 0.2 < mean < 0.8


class Reporter(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, W&B): the Trainer runs those before user callbacks."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_reporters_listed_first_receive_the_metrics(tmp_path):
    reporter = Reporter()
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=2), train_dataset=TokenData(),
                      callbacks=[reporter, DropBPCallback(sensitivity_at=None)])
    trainer.train()
    logged = [entry for entry in reporter.logs if "loss" in entry]
    assert len(logged) == 2 and all("dropbp/backward_flops_skipped" in entry for entry in logged)


def test_attach_binds_the_callback_to_a_built_trainer_and_runs_it_first(tmp_path):
    reporter = Reporter()
    model = tiny_llama()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=TokenData(),
                      callbacks=[reporter])
    callback = dropbp.attach(trainer, dropbp.DropBPConfig(drop_rate=0.5, sensitivity_at=0.5))
    assert callback.trainer is trainer and trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    assert callback.handle is dropbp.find_handle(model) and callback.handle.sensitivities is not None
    logged = [entry for entry in reporter.logs if "loss" in entry]
    assert len(logged) == 4 and all("dropbp/backward_flops_skipped" in entry for entry in logged)
    with pytest.raises(ValueError, match="already has a DropBPCallback"):
        dropbp.attach(trainer)
    with pytest.raises(ValueError, match="needs a transformers.Trainer"):
        dropbp.attach(model)


def test_a_bound_callback_measures_sensitivity_without_looking_up_the_stack(tmp_path, monkeypatch):
    """Bound by attach(), the callback does not need the call-stack fallback (here made to find nothing)."""
    import dropbp.integrations.trainer as integration

    monkeypatch.setattr(integration, "calling_instance", lambda *args, **kwargs: None)
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=2), train_dataset=TokenData())
    callback = dropbp.attach(trainer, drop_rate=0.5, sensitivity_at=0.5)
    trainer.train()
    assert callback.handle.sensitivities is not None
    unbound = Trainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=2), train_dataset=TokenData(),
                      callbacks=[DropBPCallback(drop_rate=0.5, sensitivity_at=0.5)])
    with pytest.raises(dropbp.DropBPError, match="no transformers.Trainer is running this callback"):
        unbound.train()


def test_uniform_rates_and_existing_handle(tmp_path):
    model = tiny_llama()
    handle = dropbp.apply(model, drop_rate=0.3, seed=4)
    callback = DropBPCallback(drop_rate=0.5, sensitivity_at=None)
    Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=TokenData(),
            callbacks=[callback]).train()
    assert callback.handle is handle and handle.drop_rates == [0.3] * 6 and handle.sensitivities is None


@pytest.mark.parametrize("sensitivity_at, drop_schedule", [(0.5, "constant"), (0.7, "constant"), (0.5, "cosine:0.75:0")])
def test_resume_continues_the_same_masks(tmp_path, sensitivity_at, drop_schedule):
    """Uninterrupted 6 steps vs 3 steps + resume: identical masks and rates (measured before or after the cut),
    also where the rate follows a schedule over the run's 12 mask steps (6 steps of 2 micro-batches)."""

    def run(output, max_steps, resume=None, save=False):
        model = tiny_llama()
        masks = MaskLog(model)
        callback = DropBPCallback(drop_rate=0.5, sensitivity_at=sensitivity_at, drop_schedule=drop_schedule)
        extra = dict(save_strategy="steps", save_steps=3) if save else {}
        args = training_args(output, max_steps=6, **extra)
        trainer = Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[callback])
        if max_steps < 6:  # stop early, as a crash would, after the step-3 checkpoint
            trainer.add_callback(StopAt(max_steps))
        trainer.train(resume_from_checkpoint=resume)
        return masks.masks, callback.handle

    full_masks, full_handle = run(tmp_path / "full", 6)
    first_masks, _ = run(tmp_path / "cut", 3, save=True)
    resumed_masks, resumed_handle = run(tmp_path / "cut", 6, resume=str(tmp_path / "cut" / "checkpoint-3"))
    assert first_masks + resumed_masks == full_masks
    assert resumed_handle.drop_rates == pytest.approx(full_handle.drop_rates, rel=1e-6)
    assert resumed_handle.step_count == full_handle.step_count
    if drop_schedule != "constant":
        assert full_handle.total_steps == 12 and full_handle.rates_at(11) == [0.0] * 6
        assert not any(full_masks[-1])


def test_sft_trainer(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = byte_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None, max_position_embeddings=256)
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "completion": [{"role": "assistant", "content": str(2 * i)}]} for i in range(16)]
    config = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                       save_strategy="no", report_to="none", use_cpu=True, max_length=64, disable_tqdm=True)
    callback = DropBPCallback(drop_rate=0.5, sensitivity_at=0.25)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    assert all(s > 0 for s in callback.handle.sensitivities)
    # Rates were allocated at the measured batch's length; attention FLOPs shift with the length.
    assert callback.handle.dropped_flops_fraction() == pytest.approx(0.5, abs=0.02)
    assert any("dropbp/drop_rate" in e for e in trainer.state.log_history)


def test_bad_callback_settings():
    with pytest.raises(ValueError, match="drop_rate"):
        DropBPCallback(drop_rate=1.2)
    with pytest.raises(ValueError, match="not both"):
        DropBPCallback(dropbp.DropBPConfig(), seed=1)


def test_import_dropbp_does_not_import_transformers():
    code = "import sys, dropbp; assert 'transformers' not in sys.modules, 'transformers imported'; dropbp.apply"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_compile_is_refused_at_train_begin(tmp_path):
    args = training_args(tmp_path, torch_compile=True, torch_compile_backend="eager")
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=TokenData(), callbacks=[DropBPCallback()])
    with pytest.raises(ValueError, match="DropBP: torch.compile is not supported for training"):
        trainer.train()


def test_an_moe_router_auxiliary_loss_with_sensitivity_at_fails_at_train_begin(tmp_path):
    import transformers as T

    from dropbp.tiny import tiny_causal_lm

    model = tiny_causal_lm(T.AutoConfig.for_model("mixtral", output_router_logits=True, vocab_size=64))
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenData(),
                      callbacks=[DropBPCallback(sensitivity_at=0.5)])
    with pytest.raises(dropbp.DropBPError, match="misses the MoE router's auxiliary loss"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_one_mask_per_optimizer_step_with_auto_step_off(tmp_path):
    model = tiny_llama()
    masks = MaskLog(model)
    callback = DropBPCallback(drop_rate=0.5, sensitivity_at=None, auto_step=False)
    Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenData(), callbacks=[callback]).train()
    assert callback.handle.step_count == 6 == len(masks.masks)  # 2 micro-batches share each mask


def test_reentrant_checkpointing_with_lora_measures_sensitivity(tmp_path):
    """PEFT's kbit preparation turns on reentrant checkpointing; the measurement still works."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    args = training_args(tmp_path, gradient_checkpointing=True,
                         gradient_checkpointing_kwargs={"use_reentrant": True})
    callback = DropBPCallback(drop_rate=0.5, sensitivity_at=0.3)
    Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[callback]).train()
    assert callback.handle.sensitivities is not None and any(s > 0 for s in callback.handle.sensitivities)
    assert callback.handle.dropped_flops_fraction() == pytest.approx(0.5)


def test_a_checkpointing_function_that_cannot_run_autograd_grad_fails_at_train_begin(tmp_path):
    import functools

    def custom_checkpoint(function, *args, **kwargs):  # e.g. a framework's own reentrant variant
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True, **kwargs)

    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = functools.partial(custom_checkpoint)
    callback = DropBPCallback(drop_rate=0.5, sensitivity_at=0.5)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenData(), callbacks=[callback])
    with pytest.raises(RuntimeError, match="DropBP: sensitivity_at needs torch.autograd.grad.*custom_checkpoint"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("examples", [1, None])
def test_sensitivity_is_measured_on_the_first_examples_of_the_batch(tmp_path, examples):
    model = tiny_llama()
    sizes = []
    model.register_forward_pre_hook(lambda m, a, k: sizes.append(k["input_ids"].shape[0]), with_kwargs=True)
    callback = DropBPCallback(drop_rate=0.5, sensitivity_at=0.5, sensitivity_examples=examples)
    Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenData(), callbacks=[callback]).train()
    assert callback.handle.sensitivities is not None
    # 12 training micro-batches of 2, and the measurement's one forward, on 1 example or on all 2
    assert sizes.count(1) == (1 if examples == 1 else 0)
    assert sizes.count(2) == (12 if examples == 1 else 13)


def test_first_examples_cuts_only_tensors_with_the_batch_dimension():
    from dropbp.integrations.trainer import _first_examples

    ids, scalar, other = torch.zeros(4, 3), torch.tensor(1.0), torch.zeros(2, 3)
    inputs = {"input_ids": ids, "nested": {"labels": ids, "pair": (ids, other)}, "scale": scalar, "extra": other,
              "flag": True}
    cut = _first_examples(inputs, 2)
    assert cut["input_ids"].shape == cut["nested"]["labels"].shape == cut["nested"]["pair"][0].shape == (2, 3)
    assert cut["scale"] is scalar and cut["extra"] is other and cut["nested"]["pair"][1] is other
    assert cut["flag"] is True
    assert _first_examples(inputs, None) is inputs


def test_sensitivity_outside_a_trainer_is_refused_at_train_begin(tmp_path):
    from transformers import TrainerControl, TrainerState

    callback = DropBPCallback(drop_rate=0.5, sensitivity_at=0.1)
    with pytest.raises(dropbp.DropBPError, match="no transformers.Trainer is running this callback"):
        callback.on_train_begin(training_args(tmp_path), TrainerState(), TrainerControl(), model=tiny_llama())


def test_sensitivity_with_label_smoothing_measures_the_smoothed_training_loss(tmp_path):
    # The Trainer's compute_loss pops "labels" from its inputs under label smoothing: the measurement must still
    # see them, and computes the same (smoothed) loss as training on that batch (learning rate 0: same weights).
    callback = DropBPCallback(drop_rate=0.5, sensitivity_at=0.5, sensitivity_examples=None)
    args = training_args(tmp_path, max_steps=2, gradient_accumulation_steps=1, label_smoothing_factor=0.1,
                         learning_rate=0.0)
    trainer = recording(Trainer)(model=tiny_llama(), args=args, train_dataset=TokenData(), callbacks=[callback])
    trainer.train()
    losses = trainer.losses_seen
    assert len(losses) == 3  # step 1, the measurement on step 1's batch, step 2
    assert callback.sensitivity_losses == [pytest.approx(losses[0], rel=1e-6)]
