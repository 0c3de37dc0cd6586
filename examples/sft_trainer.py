"""DropBP in TRL's SFTTrainer: the same callback.

    python examples/sft_trainer.py
"""

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from dropbp import DropBPCallback
from dropbp.app.data import bundled_data_path, load_examples
from dropbp.app.models import load_model, prepare_for_training

model, tokenizer = load_model()
model = prepare_for_training(model, "lora")
rows = [{"prompt": [{"role": "user", "content": e["prompt"]}],
         "completion": [{"role": "assistant", "content": e["response"]}]}
        for e in load_examples(bundled_data_path("train"))[:256]]

trainer = SFTTrainer(
    model=model,
    args=SFTConfig(output_dir="runs/example-sft", max_steps=20, per_device_train_batch_size=8, learning_rate=1e-3,
                   logging_steps=5, save_strategy="no", report_to="none", use_cpu=True, max_length=96),
    train_dataset=Dataset.from_list(rows),
    processing_class=tokenizer,
    callbacks=[DropBPCallback(drop_rate=0.5, sensitivity_at=0.1)],
)
trainer.train()
