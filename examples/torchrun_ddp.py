"""DropBP under DistributedDataParallel, launched by torchrun (CPU gloo here; use nccl on GPUs).

    torchrun --nproc_per_node 2 examples/torchrun_ddp.py

Every rank draws the same mask with no communication: masks depend only on (seed, step, rates).
DDP must be told that dropped branches leave parameters without gradients.
"""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import dropbp
from dropbp.app.data import bundled_data_path, collate, load_examples, tokenize_example
from dropbp.app.models import load_model, prepare_for_training

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same LoRA initialisation on every rank
model, tokenizer = load_model()
model = prepare_for_training(model, "lora")
handle = dropbp.apply(model, drop_rate=0.5, seed=0, check_ranks=True)  # check_ranks: a debug all_gather per step
ddp = DistributedDataParallel(model, find_unused_parameters=True)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

examples = load_examples(bundled_data_path("train"))[rank::world][:40]
model.train()
for step in range(5):
    batch = collate([tokenize_example(tokenizer, e["prompt"], e["response"], 96) for e in examples[step * 8 : step * 8 + 8]],
                    tokenizer.pad_token_id)
    loss = ddp(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if rank == 0:
        print(f"step {step} loss {loss.item():.3f} mask {''.join('x' if m else '.' for m in handle.mask)}")
dist.destroy_process_group()
