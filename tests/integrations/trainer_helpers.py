"""Trainer pieces shared by the Trainer and TRL tests and the Accelerate worker (not a test module)."""

import torch
from transformers import TrainerCallback, TrainingArguments

import dropbp

__all__ = ["MaskLog", "StopAt", "TokenData", "recording", "training_args"]


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=32, length=12, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **overrides})


class MaskLog:
    """Records the mask of every step the handle samples (sensitivity forwards sample none)."""

    def __init__(self, model):
        self.masks = []
        self.seen = None
        model.register_forward_hook(self.record)

    def record(self, module, args, output):
        handle = dropbp.find_handle(module)
        if handle.step_count != self.seen:
            self.seen = handle.step_count
            self.masks.append(handle.mask)


class StopAt(TrainerCallback):
    """Ends training after ``step`` optimizer steps, as an interrupted job would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def recording(trainer_class):
    """``trainer_class`` that keeps every compute_loss value, and how many values each TRL metric holds at each log."""

    class Recording(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.__dict__.setdefault("losses_seen", []).append(loss.item())
            return loss

        def log(self, logs, *args, **kwargs):
            metrics = getattr(self, "_metrics", {}).get("train", {})
            self.__dict__.setdefault("metric_counts", []).append({k: len(v) for k, v in metrics.items()})
            super().log(logs, *args, **kwargs)

    return Recording
