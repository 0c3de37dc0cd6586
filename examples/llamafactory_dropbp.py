"""DropBP in LLaMA-Factory: pass the callback to ``run_exp``.

``run_exp`` takes what a ``llamafactory-cli train`` YAML file holds, as a dict, and extra
Trainer callbacks; DropBP then works as in any Trainer. A LoRA SFT run:

    python examples/llamafactory_dropbp.py --model Qwen/Qwen2.5-0.5B-Instruct --template qwen \
        --dataset alpaca_en_demo --dataset_dir LLaMA-Factory/data

Needs ``pip install llamafactory`` beside dropbp (a separate environment: LLaMA-Factory pins
transformers, peft, trl, accelerate and datasets below dropbp's newest).
"""

import argparse

from llamafactory.train.tuner import run_exp

from dropbp import DropBPCallback

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="Hugging Face model id or local folder")
parser.add_argument("--template", default="qwen", help="LLaMA-Factory chat template matching the model")
parser.add_argument("--dataset", default="alpaca_en_demo", help="a dataset named in DATASET_DIR/dataset_info.json")
parser.add_argument("--dataset_dir", default="data")
parser.add_argument("--output_dir", default="runs/example-llamafactory")
parser.add_argument("--max_steps", type=int, default=20)
parser.add_argument("--drop_rate", type=float, default=0.5)
parser.add_argument("--cpu", action="store_true", help="train on CPU even where an accelerator is present")
args = parser.parse_args()

run_exp(
    args=dict(
        stage="sft", do_train=True, finetuning_type="lora", lora_target="all", lora_rank=8,
        model_name_or_path=args.model, template=args.template, dataset=args.dataset, dataset_dir=args.dataset_dir,
        cutoff_len=256, output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=args.cpu, seed=0,
    ),
    callbacks=[DropBPCallback(drop_rate=args.drop_rate)],
)
