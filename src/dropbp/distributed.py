"""Data-parallel support: DDP and FSDP checks, rank averaging and the ``check_ranks`` debug check.

Masks need no communication (they are a function of seed, step and rates), so this module
only refuses wrappers that cannot work, averages sensitivities so every rank allocates the
same rates, and offers an all_gather check of the masks for debugging.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "FSDP1_SENSITIVITY_REFUSED", "assert_same_on_all_ranks", "average_over_ranks", "fsdp_modules", "gathered",
    "require_find_unused",
]


def average_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Average per-rank sensitivities so every rank allocates the same rates (and masks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def fsdp_modules(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The FSDP1 (``FullyShardedDataParallel``) and FSDP2 (``fully_shard``) modules in ``model``."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    if fsdp is None:
        return [], []
    v1, v2 = getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None)
    modules = list(model.modules())
    return ([m for m in modules if v1 and isinstance(m, v1)], [m for m in modules if v2 and isinstance(m, v2)])


FSDP1_SENSITIVITY_REFUSED = (
    "sensitivity needs each parameter's own gradient, and FSDP1 flattens parameters into shards: measure it "
    "before wrapping (handle.sensitivity on the unwrapped model, then carry the rates over with "
    "handle.state_dict), use FSDP2 (fully_shard), or train with uniform rates (DropBPCallback(sensitivity_at=None))"
)


@contextlib.contextmanager
def gathered(fsdp2: Sequence[nn.Module]) -> Iterator[Callable[[], None]]:
    """Keep FSDP2 parameters unsharded; yields the re-gather to call before each backward.

    Each backward ends in FSDP2's reshard, which frees the unsharded storage that the
    retained graph still reads, so every partial backward of the exact sensitivity
    gathers again first. All ranks make the same calls, so the collectives line up.
    """

    def gather() -> None:
        for module in fsdp2:
            module.unshard()

    gather()
    try:
        yield gather
    finally:
        for module in fsdp2:
            module.reshard()


def require_find_unused(ddp: nn.Module) -> None:
    if not getattr(ddp, "find_unused_parameters", True):
        raise ValueError(
            "DropBP leaves dropped branches' parameters without gradients, which DistributedDataParallel "
            "only accepts with find_unused_parameters=True; wrap the model with "
            "DistributedDataParallel(model, find_unused_parameters=True) (HF Trainer: "
            "TrainingArguments(ddp_find_unused_parameters=True))"
        )


def assert_same_on_all_ranks(step: int, mask: list[bool]) -> None:
    """Debug check: one all_gather of (step, mask) and a comparison (``check_ranks=True``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    local = torch.tensor([step, *mask], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        local = local.cuda()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, local):
            raise RuntimeError(
                f"DropBP masks differ between rank {dist.get_rank()} and rank {rank} at step {step}: "
                "give every rank the same seed, drop rates and step counter"
            )
