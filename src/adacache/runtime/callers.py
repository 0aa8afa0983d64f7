"""Who calls a compiled model: a diffusers pipeline (compiled or plain), or the user's loop.

A leaf module: the runtime asks it whether an inferred request came from inside a plain
pipeline, and the pipeline module marks the classes it makes, without importing each other.
"""

from __future__ import annotations

import sys
from typing import Any

#: The attribute a compiled pipeline's class carries: the pipeline class it was made from.
COMPILED_PIPELINE_MARK = "_adacache_pipeline_base"

#: How many frames up a pipeline's ``__call__`` is looked for (module ``__call__``, hooks, ...).
_FRAMES_SEARCHED = 48


def is_pipeline(obj: Any) -> bool:
    """Whether ``obj`` is a diffusers pipeline (without importing diffusers when it is absent)."""
    return any(cls.__name__ == "DiffusionPipeline" for cls in type(obj).__mro__) and hasattr(obj, "components")


def is_compiled_pipeline(obj: Any) -> bool:
    """Whether ``obj`` is a pipeline returned by ``adacache.compile`` (each call one request)."""
    return hasattr(type(obj), COMPILED_PIPELINE_MARK)


def calling_plain_pipeline(depth: int = 1) -> Any | None:
    """The plain (not compiled) diffusers pipeline whose ``__call__`` is on the stack above
    the caller's frame ``depth`` levels up, or None."""
    frame = sys._getframe(depth + 1)
    for _ in range(_FRAMES_SEARCHED):
        if frame is None:
            return None
        if frame.f_code.co_name == "__call__":
            owner = frame.f_locals.get("self")
            if is_pipeline(owner) and not is_compiled_pipeline(owner):
                return owner
        frame = frame.f_back
    return None
