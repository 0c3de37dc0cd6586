"""The error DropBP raises where a call pattern would otherwise give wrong gradients."""

from __future__ import annotations

__all__ = ["DropBPError"]


class DropBPError(RuntimeError):
    """A call pattern DropBP cannot make exact; the message says what to change."""

    def __init__(self, message: str):
        super().__init__(f"DropBP: {message}")
