"""Finding the object whose method is running further up the call stack.

DeepSpeed's engine and the Hugging Face Trainer call into DropBP's hooks and callback without
passing themselves along; their ``self`` is on the stack, a few frames up.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["calling_instance"]


def calling_instance(kind: type, depth: int, function: str | None = None) -> Any | None:
    """The ``self`` of the nearest method of a ``kind`` instance on the caller's stack, or None.

    Args:
        kind: The class to look for (subclasses match).
        depth: How many frames above the caller to look at.
        function: Only frames of methods of this name (cheaper where it is called often).

    Returns:
        The instance, or None if none is within ``depth`` frames.
    """
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        code = frame.f_code
        if (function is None or code.co_name == function) and code.co_argcount and code.co_varnames[0] == "self":
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, kind):
                return candidate
        frame = frame.f_back
    return None
