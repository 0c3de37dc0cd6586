"""DropBP in a Hugging Face Trainer: one callback.

    python examples/trainer.py
"""

from datasets import Dataset
from transformers import Trainer, TrainingArguments

from dropbp import DropBPCallback
from dropbp.app.data import bundled_data_path, collate, load_examples, tokenize_example
from dropbp.app.models import load_model, prepare_for_training

model, tokenizer = load_model()
model = prepare_for_training(model, "lora")
rows = [tokenize_example(tokenizer, e["prompt"], e["response"], 96)
        for e in load_examples(bundled_data_path("train"))[:256]]

trainer = Trainer(
    model=model,
    args=TrainingArguments(output_dir="runs/example-trainer", max_steps=20, per_device_train_batch_size=8,
                           learning_rate=1e-3, logging_steps=5, save_strategy="no", report_to="none", use_cpu=True),
    train_dataset=Dataset.from_list(rows),
    data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
    callbacks=[DropBPCallback(drop_rate=0.5, sensitivity_at=0.1)],
)
trainer.train()
