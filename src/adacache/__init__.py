"""adacache: graph-level feature caching for diffusion transformers.

    pipe = adacache.compile(pipe, policy=adacache.FORA(interval=3))  # a diffusers pipeline
    image = pipe("a cat", num_inference_steps=50).images[0]           # each call one request
    print(adacache.summary(pipe))

    model = adacache.compile(model, policy=adacache.FORA(interval=3))  # or a bare denoiser
    model.adacache.new_request()                                        # in your own loop
    for t in scheduler.timesteps:
        eps = model(latents, timestep=t, class_labels=y).sample

Names are imported lazily, so ``adacache.load`` (the ONNX Runtime loader) works in a
deployment environment that has onnxruntime and numpy but no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .policies import POLICIES

__version__ = "0.1.0"

_EXPORTS = {
    "compile": "adacache.api",
    "uncompile": "adacache.api",
    "explain": "adacache.api",
    "session": "adacache.api",
    "summary": "adacache.api",
    "export": "adacache.api",
    "load": "adacache.deploy",
    "check_artifact": "adacache.deploy",
    "AdaCacheError": "adacache.errors",
    "CaptureError": "adacache.errors",
    "NotEligibleError": "adacache.errors",
    "PolicyError": "adacache.errors",
    "SessionError": "adacache.errors",
    "ExportError": "adacache.errors",
    "ArtifactError": "adacache.errors",
    "InputError": "adacache.errors",
    "RequestBoundaryWarning": "adacache.errors",
    "CaptureFallbackWarning": "adacache.errors",
    "TimestepWarning": "adacache.errors",
    "Summary": "adacache.report",
    "graph_diff": "adacache.report",
    "graph_structure": "adacache.report",
    "sample": "adacache.runtime.sampling",
    "calibrate": "adacache.calibration",
    "Policy": "adacache.policies",
    "StepContext": "adacache.policies",
    "CachedModule": "adacache.runtime",
}
_EXPORTS.update(dict.fromkeys(POLICIES, "adacache.policies"))  # the policy registry: one line per method

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adacache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
