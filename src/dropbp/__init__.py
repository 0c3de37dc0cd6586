"""DropBP: skip the backward pass of random residual branches to fine-tune faster.

Implements DropBP (Woo et al., NeurIPS 2024, arXiv 2402.17812)::

    import dropbp
    handle = dropbp.apply(model, drop_rate=0.5)

``import dropbp`` imports torch only; the Hugging Face integration loads lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dropbp.allocation import allocate_drop_rates
from dropbp.api import apply
from dropbp.branches import Branch
from dropbp.config import DropBPConfig
from dropbp.errors import DropBPError
from dropbp.handle import DropBPHandle, find_handle
from dropbp.masks import sample_mask
from dropbp.verify import CheckReport, CheckResult, check

if TYPE_CHECKING:
    from dropbp.integrations.trainer import DropBPCallback, attach

__version__ = "0.1.0"

__all__ = [
    "Branch",
    "CheckReport",
    "CheckResult",
    "DropBPCallback",
    "DropBPConfig",
    "DropBPError",
    "DropBPHandle",
    "__version__",
    "allocate_drop_rates",
    "apply",
    "attach",
    "check",
    "find_handle",
    "sample_mask",
]


def __getattr__(name: str) -> Any:
    # transformers is heavy and optional: import it only when the callback is asked for.
    if name in ("DropBPCallback", "attach"):
        from dropbp.integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'dropbp' has no attribute {name!r}")
