"""The one configuration object behind ``dropbp.apply``, ``DropBPCallback`` and the CLI."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Literal

from dropbp.masks import MASK_MODES
from dropbp.schedules import parse_schedule
from dropbp.validation import check_int, check_rate

__all__ = ["DropBPConfig"]


@dataclass
class DropBPConfig:
    """Settings of a DropBP run.

    Every field has a ``help`` entry in its metadata; the CLI builds its options from them.

    Raises:
        ValueError: From ``__post_init__``, on any out-of-range field.
    """

    drop_rate: float = field(
        default=0.5,
        metadata={"help": "Target fraction of branch FLOPs whose backward is skipped, in [0, max_rate]."},
    )
    seed: int = field(default=0, metadata={"help": "Mask seed; every rank must use the same one."})
    max_rate: float = field(default=0.9, metadata={"help": "Upper bound on any one branch's drop rate, in (0, 1)."})
    sensitivity_at: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of training after which sensitivity is measured and rates allocated (0.1 is the "
            "paper's choice); None keeps the rates uniform, which did as well in the measured default job."
        },
    )
    sensitivity_batches: int = field(
        default=1, metadata={"help": "Training batches averaged for the sensitivity measurement."}
    )
    sensitivity_examples: int | None = field(
        default=1,
        metadata={
            "help": "Examples of each batch the sensitivity is measured on (the first ones); None: the whole batch. "
            "The measurement costs one partial backward per branch, so it scales with this."
        },
    )
    branches: list[str] | None = field(
        default=None,
        metadata={"help": "fnmatch patterns of residual-branch module names; None auto-detects."},
    )
    auto_step: bool = field(
        default=True,
        metadata={
            "help": "True: every training forward (each micro-batch) samples its own mask. False: one mask per "
            "optimizer step, shared by its micro-batches (the Trainer callback steps it; with dropbp.apply, "
            "call handle.step())."
        },
    )
    replay: bool = field(
        default=True,
        metadata={
            "help": "Under gradient checkpointing, replay a dropped branch's first-pass output in the recompute "
            "instead of running it again (exact; saves its forward FLOPs, keeps its output until then)."
        },
    )
    allocation: Literal["exact", "greedy"] = field(
        default="exact", metadata={"help": "Drop-rate allocation: exact water-filling or the paper's greedy."}
    )
    sensitivity_metric: Literal["grad_diff", "grad_norm_diff"] = field(
        default="grad_diff",
        metadata={
            "help": "grad_diff: ||G - G_-l||^2. grad_norm_diff: the paper code's sum of squared "
            "differences of per-parameter gradient norms."
        },
    )
    # Last, so that positional construction from before it existed keeps its meaning.
    drop_schedule: str = field(
        default="constant",
        metadata={
            "help": "How the drop rate moves over the run: constant; warmup:F (from 0 over the first fraction F); "
            "cooldown:F (to 0 over the last fraction F); linear:A:B or cosine:A:B (from rate A to rate B). "
            "Allocated per-branch rates are scaled with it."
        },
    )
    mask: Literal["random", "structured"] = field(
        default="random",
        metadata={
            "help": "random: each branch dropped independently at its rate (the paper's). structured: every "
            "branch below a random cut is dropped, so kept branches get exact gradients; the cut drops drop_rate "
            "of the branches on average, and per-branch rates (sensitivity_at) do not apply."
        },
    )

    def __post_init__(self) -> None:
        check_rate(self.drop_rate, "drop_rate")
        # Integers only (no bools, no floats, not even 2.0), as plain ints: a fractional value
        # would otherwise be truncated somewhere or fail mid-training.
        self.seed = check_int(self.seed, "seed")
        self.sensitivity_batches = check_int(self.sensitivity_batches, "sensitivity_batches", minimum=1)
        if self.sensitivity_examples is not None:
            try:
                self.sensitivity_examples = check_int(self.sensitivity_examples, "sensitivity_examples", minimum=1)
            except ValueError:
                raise ValueError(
                    f"sensitivity_examples must be an integer >= 1 or None (the whole batch), "
                    f"got {self.sensitivity_examples!r}"
                ) from None
        if math.isnan(self.max_rate) or not 0.0 < self.max_rate < 1.0:
            raise ValueError(f"max_rate must be in (0, 1), got {self.max_rate!r}")
        if self.drop_rate > self.max_rate:
            raise ValueError(
                f"drop_rate {self.drop_rate} exceeds max_rate {self.max_rate}; lower drop_rate or raise max_rate"
            )
        if self.sensitivity_at is not None and not 0.0 <= self.sensitivity_at < 1.0:
            raise ValueError(f"sensitivity_at must be in [0, 1) or None, got {self.sensitivity_at!r}")
        if self.allocation not in ("exact", "greedy"):
            raise ValueError(f"allocation must be 'exact' or 'greedy', got {self.allocation!r}")
        if self.sensitivity_metric not in ("grad_diff", "grad_norm_diff"):
            raise ValueError(
                f"sensitivity_metric must be 'grad_diff' or 'grad_norm_diff', got {self.sensitivity_metric!r}"
            )
        parse_schedule(self.drop_schedule)
        if self.mask not in MASK_MODES:
            raise ValueError(f"mask must be 'random' or 'structured', got {self.mask!r}")
        if self.mask == "structured" and self.sensitivity_at is not None:
            raise ValueError(
                "mask='structured' drops the branches below a random cut, so per-branch rates from sensitivity do "
                "not apply; pass sensitivity_at=None, or mask='random'"
            )
        if isinstance(self.branches, str):
            self.branches = [self.branches]

    def sensitivity_step(self, max_steps: int) -> int | None:
        """The optimizer step after which sensitivity is measured (None: never).

        ``ceil(sensitivity_at * max_steps)``, at least 1, computed on the decimal value written
        (``0.07`` is 7/100, not the binary float just above it), so 0.07 of 100 steps is step 7.
        """
        if self.sensitivity_at is None:
            return None
        return max(1, math.ceil(_exact(self.sensitivity_at) * _exact(max_steps)))

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict."""
        return asdict(self)


def _exact(value: Any) -> Fraction:
    """The rational a number was written as: its shortest decimal form (``str``) for floats.

    ``str`` of a float (or numpy float) is the shortest decimal that reads back as the same float,
    that is what the user wrote; ints, Fractions and Decimals are exact already.
    """
    try:
        return Fraction(str(value))
    except ValueError:  # e.g. a 0-d tensor, whose str is not a number
        return Fraction(float(value))
