"""adacache: graph-level feature caching for diffusion transformers.

    model = adacache.compile(model, policy=adacache.FORA(interval=3))
    for t in scheduler.timesteps:
        eps = model(latents, timestep=t, class_labels=y).sample
        ...
    print(adacache.summary(model))
"""

from .api import compile, explain, session, summary
from .errors import AdaCacheError, CaptureError, NotEligibleError, PolicyError, SessionError
from .explain import Summary, graph_diff, graph_structure
from .policies import FORA, FirstBlockCache, NoCache, Policy, StepContext
from .runtime import CachedModule

__version__ = "0.1.0"

__all__ = [
    "FORA",
    "AdaCacheError",
    "CachedModule",
    "CaptureError",
    "FirstBlockCache",
    "NoCache",
    "NotEligibleError",
    "Policy",
    "PolicyError",
    "SessionError",
    "StepContext",
    "Summary",
    "compile",
    "explain",
    "graph_diff",
    "graph_structure",
    "session",
    "summary",
]
