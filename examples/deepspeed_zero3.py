"""DropBP under DeepSpeed ZeRO-3, launched by torchrun (CPU gloo here; on GPUs drop DS_ACCELERATOR and use nccl).

    torchrun --nproc_per_node 2 examples/deepspeed_zero3.py

Nothing DeepSpeed-specific is needed: DropBP finds the engine at the first training step, zeroes the
gradient partitions ZeRO-3 keeps across steps (so a dropped branch is not updated with an old gradient),
and refuses, with a one-line error, what it cannot make exact (see the README's compatibility table).
"""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402

import dropbp  # noqa: E402
from dropbp.app.data import bundled_data_path, collate, load_examples, tokenize_example  # noqa: E402
from dropbp.app.models import load_model, prepare_for_training  # noqa: E402

deepspeed.init_distributed("gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
torch.manual_seed(0)  # the same LoRA initialisation on every rank
model, tokenizer = load_model()
model = prepare_for_training(model, "lora")
handle = dropbp.apply(model, drop_rate=0.5, seed=0)  # before or after deepspeed.initialize
config = {
    "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
    "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
}
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

examples = load_examples(bundled_data_path("train"))[rank::world][:40]
engine.train()
for micro in range(10):
    rows = examples[micro * 4 : micro * 4 + 4]
    batch = collate([tokenize_example(tokenizer, e["prompt"], e["response"], 96) for e in rows], tokenizer.pad_token_id)
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()  # DeepSpeed steps the optimizer every gradient_accumulation_steps micro-batches
    if rank == 0:
        print(f"micro-batch {micro} loss {loss.item():.3f} mask {''.join('x' if m else '.' for m in handle.mask)}")
