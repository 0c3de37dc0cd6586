"""DropBP in a plain PyTorch training loop: LoRA on the bundled SmolLM2-135M-Instruct.

    python examples/manual_loop.py
"""

import torch

import dropbp
from dropbp.app.data import bundled_data_path, collate, load_examples, tokenize_example
from dropbp.app.models import load_model, prepare_for_training

model, tokenizer = load_model()  # bundled model; pass a local folder to use your own
model = prepare_for_training(model, "lora")
examples = load_examples(bundled_data_path("train"))[:64]
batches = [
    collate([tokenize_example(tokenizer, e["prompt"], e["response"], 96) for e in examples[i : i + 8]],
            tokenizer.pad_token_id)
    for i in range(0, len(examples), 8)
]

handle = dropbp.apply(model, drop_rate=0.5)  # the one DropBP line
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
for step, batch in enumerate(batches, 1):
    loss = model(**batch).loss  # this forward sampled a fresh mask
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step == 2:  # optional: allocate per-branch rates from a measured sensitivity
        handle.calibrate([lambda: model(**batch).loss], target=0.5)
    print(f"step {step} loss {loss.item():.3f} dropped {sum(handle.mask)}/{len(handle.branches)} branches")
