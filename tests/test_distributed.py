"""DropBP's own gloo group in one process (world size 1); two ranks: tests/integrations/test_ddp.py."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dropbp import distributed

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def thread_ids() -> set[int]:
    """Ids of this process's threads, C++ ones included (``threading`` lists only Python's).

    By id, not by name: gloo names its threads (``pt_gloo_runloop``) some time after it starts them.
    """
    return {int(task.name) for task in Path("/proc/self/task").iterdir()}


@pytest.fixture
def world(tmp_path):
    """A gloo world of one process; torn down (with DropBP's group) after the test."""
    counter = iter(range(100))

    def init() -> None:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store-{next(counter)}", rank=0, world_size=1)

    init()
    yield init
    distributed.release_group()
    if dist.is_initialized():
        dist.destroy_process_group()


def test_world_of_one_needs_no_collective(world):
    assert distributed.average_over_ranks([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
    distributed.assert_same_on_all_ranks(0, [True, False])
    assert distributed._group is None  # nothing to compare with: no group made


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc")
def test_release_joins_the_groups_threads(world):
    before = thread_ids()
    group = distributed._own_group()
    assert distributed._own_group() is group  # made once, then reused
    tensor = torch.ones(3)
    dist.all_reduce(tensor, group=group)
    made = thread_ids() - before
    assert made, "the group started no thread: nothing to check"
    del group
    distributed.release_group()
    assert not made & thread_ids()  # joined, not left to die at interpreter exit
    assert distributed._group is None
    distributed.release_group()  # nothing left: a no-op


def test_a_destroyed_world_gets_a_new_group(world):
    first = distributed._own_group()
    dist.destroy_process_group()  # destroys every group, DropBP's included
    world()
    second = distributed._own_group()
    assert second is not first
    assert dist.get_process_group_ranks(second) == [0]
    del first, second
