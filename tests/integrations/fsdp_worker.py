"""Worker for test_fsdp.py, launched by torchrun with 2 gloo processes (not a test module itself).

Each rank trains on its half of the global batch with DropBP (``check_ranks=True``), with the
decoder layers and the root sharded by FSDP2 (``fully_shard``) or FSDP1
(``FullyShardedDataParallel`` with a transformer auto-wrap policy). After every backward the
full (unsharded) gradients are assembled; rank 0 saves them with the final full weights and
the branch names. Every rank then calibrates on its last local batch (FSDP2 gathers the
parameters for it; FSDP1 refuses) and records the outcome, with what the Trainer callback
says at train begin.
"""

import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddp_worker import PER_RANK, STEPS, global_batch, start_worker  # noqa: E402

import dropbp  # noqa: E402


def fsdp2(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def full_grads():
        return {n: None if p.grad is None else p.grad.full_tensor() for n, p in model.named_parameters()}

    def full_state():
        return {n: v.full_tensor() for n, v in model.state_dict().items()}

    return model, full_grads, full_state


def fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True,
                                       device_id=torch.device("cpu"))

    def full_grads():
        with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True, writeback=False):
            return {n.replace("_fsdp_wrapped_module.", ""): None if p.grad is None else p.grad.clone()
                    for n, p in wrapped.named_parameters()}

    def full_state():
        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
            return {n: v.clone() for n, v in model.state_dict().items()}

    return wrapped, full_grads, full_state


def main() -> None:
    args, rank, model = start_worker(["fsdp2", "fsdp1"])
    if args.mode == "fsdp2":  # DropBP before sharding, as a user would write it
        handle = dropbp.apply(model, drop_rate=0.5, seed=7, check_ranks=True)
        wrapped, full_grads, full_state = fsdp2(model)
    else:  # DropBP after wrapping: names see through _fsdp_wrapped_module
        wrapped, full_grads, full_state = fsdp1(model)
        handle = dropbp.apply(model, drop_rate=0.5, seed=7, check_ranks=True)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    grads, masks = [], []
    for step in range(STEPS):
        local = global_batch(step)[rank * PER_RANK : (rank + 1) * PER_RANK]
        wrapped(local, labels=local).loss.backward()
        grads.append(full_grads())
        masks.append(handle.mask)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # Sensitivity: FSDP2 gathers the parameters for it (rates must come out equal on all ranks); FSDP1 refuses.
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from dropbp import DropBPCallback
    from dropbp.errors import DropBPError

    outcome = {}
    try:
        outcome["rates"] = handle.calibrate([lambda: wrapped(local, labels=local).loss], target=0.5)
        outcome["sensitivities"] = handle.sensitivities
    except ValueError as error:
        outcome["sensitivity_error"] = str(error)
    try:  # the Trainer callback refuses FSDP1 at train begin, not after sensitivity_at of the run
        DropBPCallback(sensitivity_at=0.5).on_train_begin(
            TrainingArguments(str(args.out), use_cpu=True, report_to="none"), TrainerState(), TrainerControl(),
            model=model)
    except (ValueError, DropBPError) as error:  # FSDP2 passes that check, then finds no Trainer calling it here
        outcome["callback_error"] = str(error)
    (args.out / f"outcome-{rank}.json").write_text(json.dumps(outcome))
    state = full_state()
    if rank == 0:
        torch.save({"grads": grads, "masks": masks, "state": state, "branches": [b.name for b in handle.branches],
                    "steps": handle.step_count}, args.out / f"{args.mode}.pt")
    wrapped(local, labels=local).loss.backward()  # training still works after the measurement
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
