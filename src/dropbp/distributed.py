"""Data-parallel support: DDP and FSDP checks, rank averaging and the ``check_ranks`` debug check.

Masks need no communication (they are a function of seed, step and rates), so this module
only refuses wrappers that cannot work, averages sensitivities so every rank allocates the
same rates, and offers an all_gather check of the masks for debugging.

DropBP's own collectives (the rank averaging and the ``check_ranks`` all_gather) run on a
CPU gloo group of its own, which it tears down before it raises the mask mismatch and at
interpreter exit. A finished collective is released by the backend's worker thread, not by
the caller: ``wait()`` returns when the data is in, and the worker drops the work, and with
it the caller's tensors, a moment later. Dropping a tensor that Python created needs the
GIL, and once the interpreter is finalizing a thread that asks for the GIL is ended with
``pthread_exit``, which unwinds through that (noexcept) destructor into ``std::terminate``:
"terminate called without an active exception" and SIGABRT, after the traceback, on a rank
that exits right after the collective, as every rank does after the mismatch error.
``destroy_process_group`` does not help on the default group, which DistributedDataParallel
keeps alive; destroying a group nobody else holds joins its worker threads (with the GIL
released), so nothing is left in flight when the interpreter goes down.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "assert_same_on_all_ranks", "average_over_ranks", "fsdp_modules", "gathered",
    "release_group", "require_find_unused",
]

_group: Any = None  # DropBP's gloo group over all ranks, or None before the first collective
_group_lock = threading.Lock()
_atexit_registered = False


def _world_size() -> int:
    """The default group's size; 1 when torch.distributed is not in use."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _registered(group: Any) -> bool:
    """Whether ``group`` still belongs to the current default group (not destroyed with it)."""
    import torch.distributed as dist

    try:
        dist.get_process_group_ranks(group)
    except (KeyError, ValueError, RuntimeError):
        return False
    return True


def _own_group() -> Any:
    """DropBP's gloo group, created on the first collective (a collective itself: every rank calls it).

    Returns None (use the default group) where gloo is not built in.
    """
    import torch.distributed as dist

    global _group, _atexit_registered
    if not dist.is_gloo_available():
        return None
    with _group_lock:
        if _group is not None and not _registered(_group):  # the default group was destroyed (and made again)
            _drop(_group)
            _group = None
        if _group is None:
            _group = dist.new_group(backend="gloo")
            if not _atexit_registered:
                atexit.register(release_group)
                _atexit_registered = True
        return _group


def _drop(group: Any) -> None:
    """Destroy ``group`` if it is registered; dropping the last reference joins its worker threads."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and _registered(group):
        dist.destroy_process_group(group)
    # The caller's reference is the last one: ProcessGroupGloo's destructor runs when it goes,
    # waits for queued work and joins its threads with the GIL released.


def release_group() -> None:
    """Tear down DropBP's own process group (joining its threads); the next collective makes a new one.

    Called before the ``check_ranks`` error is raised and at interpreter exit; every rank
    that used the group should call it, none needs to wait for the others.
    """
    global _group
    with _group_lock:
        group, _group = _group, None
    if group is not None:
        _drop(group)
        del group


def average_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Average per-rank sensitivities so every rank allocates the same rates (and masks).

    ``device`` is where the values live; the reduction itself runs on DropBP's CPU group
    (on ``device`` with the default group where gloo is not built in).
    """
    import torch.distributed as dist

    world = _world_size()
    if world == 1:
        return values
    group = _own_group()
    tensor = torch.tensor(values, dtype=torch.float64, device="cpu" if group is not None else device)
    dist.all_reduce(tensor, group=group)
    return (tensor / world).tolist()


def fsdp_modules(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The FSDP1 (``FullyShardedDataParallel``) and FSDP2 (``fully_shard``) modules in ``model``."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    if fsdp is None:
        return [], []
    v1, v2 = getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None)
    modules = list(model.modules())
    return ([m for m in modules if v1 and isinstance(m, v1)], [m for m in modules if v2 and isinstance(m, v2)])



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
    """Debug check: one all_gather of (step, mask) and a comparison (``check_ranks=True``).

    Every rank compares every gathered row with its own, so if any two ranks differ every
    rank raises (each differs from at least one of the two). Before raising, each rank tears
    down DropBP's group, so the all_gather is fully released (see the module docstring) when
    the error ends the process.
    """
    import torch.distributed as dist

    world = _world_size()
    if world == 1:
        return
    group = _own_group()
    local = torch.tensor([step, *mask], dtype=torch.int64)
    if group is None and dist.get_backend() == "nccl":
        local = local.cuda()
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, local)]
    if differing:
        del group  # the traceback keeps this frame: no reference to the group may stay in it
        release_group()
        raise RuntimeError(
            f"DropBP masks differ between rank {dist.get_rank()} and rank {differing[0]} at step {step}: "
            "give every rank the same seed, drop rates and step counter"
        )
