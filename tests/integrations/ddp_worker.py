"""Worker for test_ddp.py, launched by torchrun with 2 gloo processes (not a test module itself).

Modes:
    train      DropBP with check_ranks=True under DDP(find_unused_parameters=True): after every
               backward the gradients are all_gathered and compared; sensitivity is measured on
               each rank's own batch and must come out identical; rank 0 saves the final weights.
    no-unused  DDP without find_unused_parameters: the first training forward must raise.
    train-checkpointing
               the same with Hugging Face gradient checkpointing (non-reentrant, the default).
    mismatch   check_ranks=True with different drop rates per rank: every rank must raise.

A process must not reach interpreter exit while a gloo worker thread is still releasing a
finished collective: releasing a tensor created in Python takes the GIL, and a thread that
asks for it during finalization is ended inside a C++ destructor (std::terminate, SIGABRT).
``destroy_process_group`` does not join the default group's threads here, because
DistributedDataParallel keeps that group alive, so the worker's own comparisons run on a gloo
group of its own, destroyed (its threads joined) before the worker returns. DropBP does the
same for its collectives (dropbp.distributed), which the mismatch mode checks: nothing in the
worker covers for it there.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_llama  # noqa: E402

import dropbp  # noqa: E402

STEPS, PER_RANK, LENGTH = 4, 2, 12


def global_batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 64, (2 * PER_RANK, LENGTH), generator=generator)


def start_worker(modes: list[str]) -> tuple[argparse.Namespace, int, torch.nn.Module]:
    """Parse ``--mode``/``--out``, join the gloo group, and build the tiny model in training mode."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=modes, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    model = tiny_llama()
    model.train()
    return args, dist.get_rank(), model


def threads() -> dict[int, str] | None:
    """This process's threads, C++ ones included (``threading`` lists only Python's): id -> name; None without /proc.

    Compare them by id: gloo names its threads (``pt_gloo_runloop``) a moment after it starts them.
    """
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    found = {}
    for task in tasks.iterdir():
        try:
            found[int(task.name)] = (task / "comm").read_text().strip()
        except OSError:  # a thread that ended meanwhile
            continue
    return found


def main() -> None:
    args, rank, model = start_worker(["train", "train-checkpointing", "no-unused", "mismatch"])
    if args.mode in ("mismatch", "no-unused"):  # the first training forward must raise on every rank
        if args.mode == "mismatch":
            dropbp.apply(model, drop_rate=0.5 if rank == 0 else 0.0, check_ranks=True)
            ddp, expected = DistributedDataParallel(model, find_unused_parameters=True), RuntimeError
        else:
            dropbp.apply(model, drop_rate=0.5)
            ddp, expected = DistributedDataParallel(model), ValueError
        before = after = threads()
        try:
            ddp(global_batch(0), labels=global_batch(0))
        except expected as error:
            (args.out / f"error-{rank}.txt").write_text(str(error))
            # Uncaught, the error ends the process with its traceback (every frame) alive: by then
            # DropBP's group, made by this forward's check, must be gone and its threads joined, or
            # one may still be releasing the all_gather when the interpreter finalizes.
            after = threads()
        left = {tid: name for tid, name in (after or {}).items() if tid not in (before or {})}
        assert not left, f"threads started by the failing forward are still running: {left}"
        dist.destroy_process_group()
        return

    checks = dist.new_group(backend="gloo")  # the worker's own comparisons (see the module docstring)
    if args.mode == "train-checkpointing":
        model.gradient_checkpointing_enable()
    handle = dropbp.apply(model, drop_rate=0.5, seed=7, check_ranks=True)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        local = global_batch(step)[rank * PER_RANK : (rank + 1) * PER_RANK]
        ddp(local, labels=local).loss.backward()
        for name, p in model.named_parameters():
            grad = p.grad if p.grad is not None else torch.full_like(p, float("nan"))
            gathered = [torch.empty_like(grad) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, grad, group=checks)
            assert torch.equal(gathered[0].nan_to_num(7.0), gathered[1].nan_to_num(7.0)), f"{name} differs"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    local = global_batch(99)[rank * PER_RANK : (rank + 1) * PER_RANK]
    rates = handle.calibrate([lambda: model(local, labels=local).loss], target=0.5)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rates, group=checks)
    assert gathered[0] == gathered[1], "allocated rates differ between ranks"
    if rank == 0:
        torch.save({"state": model.state_dict(), "rates": rates, "masks_seen": handle.step_count},
                   args.out / f"{args.mode}.pt")
    dist.destroy_process_group(checks)
    del checks  # the last reference: the group's destructor joins its threads
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
