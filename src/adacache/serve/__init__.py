"""Serving: a Ray Serve deployment of a compiled model (``adacache serve``).

:mod:`.generation` is what one request asks and answers (no Ray); :mod:`.app` puts it
behind Ray Serve's HTTP proxy. Ray is imported only when a server starts.
"""

from .generation import GenerationRequest, GenerationResult, Generator

__all__ = ["GenerationRequest", "GenerationResult", "Generator"]
