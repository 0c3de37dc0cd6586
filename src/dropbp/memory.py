"""Exact activation memory: the bytes autograd holds for backward.

Counting through ``torch.autograd.graph.saved_tensors_hooks`` is exact and the same on
every machine, unlike peak RSS. Storages are deduplicated, and parameters (which linear
layers save to compute input gradients) are left out: they are not activations.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch

__all__ = ["ActivationMeter"]


class _Saved:
    """What the pack hook hands to autograd; alive exactly as long as the saved tensor is.

    It holds ``tensor.detach()`` (same storage, no ``grad_fn``): holding a saved output
    with its ``grad_fn`` would form a node -> box -> tensor -> node cycle that keeps graphs
    alive which autograd would otherwise free.
    """

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach()


class ActivationMeter:
    """Context manager that measures the activations autograd saves for backward inside it.

    Read :attr:`held_bytes` after the forward and before ``backward()``: it counts the
    saved tensors still alive then, i.e. what the backward will use. Graphs that were
    built and dropped during the forward (the detach-style mechanism) do not count there;
    with ``track_freed=True`` :attr:`saved_bytes` also counts them, at the price of
    keeping those storages alive until the meter is discarded.

    Args:
        exclude: Tensors whose storages do not count (pass ``model.parameters()``).
        track_freed: Also total everything saved, freed or not.

    Example::

        with ActivationMeter(model.parameters()) as meter:
            loss = model(**batch).loss
        print(meter.held_bytes)
        loss.backward()
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), track_freed: bool = False):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._boxes: list[weakref.ref] = []
        self._all: dict[int, torch.UntypedStorage] | None = {} if track_freed else None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda box: box.tensor)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        box = _Saved(tensor)
        self._boxes.append(weakref.ref(box))
        if self._all is not None:
            storage = tensor.untyped_storage()
            self._all.setdefault(storage.data_ptr(), storage)  # kept alive: no address reuse
        return box

    def _count(self, storages: dict[int, int]) -> int:
        return sum(n for pointer, n in storages.items() if pointer not in self._excluded)

    @property
    def held_bytes(self) -> int:
        """Bytes of saved tensors alive now (each storage once)."""
        alive = {}
        for box in filter(None, (ref() for ref in self._boxes)):
            storage = box.tensor.untyped_storage()
            alive[storage.data_ptr()] = storage.nbytes()
        return self._count(alive)

    @property
    def saved_bytes(self) -> int:
        """Bytes of every tensor saved inside the block, freed or not (needs ``track_freed``).

        Raises:
            ValueError: If the meter was created without ``track_freed=True``.
        """
        if self._all is None:
            raise ValueError("saved_bytes needs ActivationMeter(track_freed=True)")
        return self._count({p: s.nbytes() for p, s in self._all.items()})

    def __enter__(self) -> ActivationMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
