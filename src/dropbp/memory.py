"""Exact activation memory: the bytes autograd saves for backward.

Counting through ``torch.autograd.graph.saved_tensors_hooks`` is exact and the same on
every machine, unlike peak RSS. Storages are deduplicated, and parameters (which linear
layers save to compute input gradients) are left out: they are not activations.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["ActivationMeter"]


class ActivationMeter:
    """Context manager that totals the activation bytes saved for backward inside it.

    Args:
        exclude: Tensors whose storages do not count (pass ``model.parameters()``).

    Example::

        with ActivationMeter(model.parameters()) as meter:
            model(**batch).loss.backward()
        print(meter.bytes)
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._excluded:
            self._storages[pointer] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        """Activation bytes saved so far (each storage once)."""
        return sum(self._storages.values())

    def __enter__(self) -> ActivationMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
