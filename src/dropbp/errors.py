"""DropBP's one exception type for refusals, and the refusal messages more than one module raises.

A refusal names what cannot be made exact and how to fix it, in one line. :class:`DropBPError`
is both a ``ValueError`` and a ``RuntimeError``: the refusals it now covers were raised as one or
the other before, and ``except ValueError`` / ``except RuntimeError`` written for them keeps working.
"""

from __future__ import annotations

__all__ = [
    "COMPILE_REFUSED", "DropBPError", "FSDP1_SENSITIVITY_REFUSED", "SENSITIVITY_THROUGH_ENGINE_REFUSED",
    "ZERO3_NON_REENTRANT_REFUSED", "ZERO3_SENSITIVITY_REFUSED",
]


class DropBPError(ValueError, RuntimeError):
    """A setting or call pattern DropBP cannot make exact; the message says what to change."""

    def __init__(self, message: str):
        super().__init__(f"DropBP: {message}")


COMPILE_REFUSED = (
    "torch.compile is not supported for training: a compiled graph fixes which branches build a "
    "backward, so it would either recompile for every new mask or compute wrong gradients; train the model "
    "uncompiled (HF Trainer: torch_compile=False), or call handle.remove() before compiling"
)

FSDP1_SENSITIVITY_REFUSED = (
    "sensitivity needs each parameter's own gradient, and FSDP1 flattens parameters into shards: measure it "
    "before wrapping (handle.sensitivity on the unwrapped model, then carry the rates over with "
    "handle.state_dict), use FSDP2 (fully_shard), or train with uniform rates (DropBPCallback(sensitivity_at=None))"
)

ZERO3_SENSITIVITY_REFUSED = (
    "sensitivity needs each parameter's whole gradient, and DeepSpeed ZeRO-3 partitions the parameters: measure "
    "it before deepspeed.initialize (handle.calibrate on the plain model, then carry the rates over with "
    "handle.state_dict), use ZeRO-2, or keep the rates uniform (sensitivity_at=None)"
)

# DeepSpeed counts any backward through its engine's forward as its own (and fails in its epilogue);
# the measurement's partial backwards are not training backwards.
SENSITIVITY_THROUGH_ENGINE_REFUSED = (
    "measure sensitivity with a closure that calls the model, not the DeepSpeed engine: "
    "lambda: engine.module(**batch).loss"
)

ZERO3_NON_REENTRANT_REFUSED = (
    "DeepSpeed ZeRO-3 fails in non-reentrant gradient checkpointing when a branch runs without grad "
    "(The size of tensor a (0) must match ...); enable checkpointing with "
    "gradient_checkpointing_kwargs={'use_reentrant': True}, or use ZeRO-2"
)
