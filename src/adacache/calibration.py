"""Fit model-specific policy parameters from one full-computation run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .api import compile as compile_model
from .api import session
from .policies.adacorrection import fit_offset_scales  # noqa: F401 - AdaCorrection's fit, importable from here as before
from .policies.base import Policy
from .recording import OutputRecorder


def calibrate(model: nn.Module, policy: Policy, run: Callable[[nn.Module], Any], degree: int = 4) -> Policy:
    """Fit a policy's model-specific parameters from one full-computation run of ``model``.

    ``run(denoiser)`` must perform one generation (for example
    ``lambda d: sample(d, labels, num_steps=50)``); the denoiser it receives computes every
    block while recording. Each policy says what it fits, in its own file
    (:meth:`Policy.calibrate`; ``policy.calibratable`` tells whether it fits anything): for
    example TeaCache's rescaling polynomial (``degree``), MagCache's magnitude-ratio curve,
    AdaCorrection's per-unit scales (after its base's, with the same run).

    Returns a copy of ``policy`` with the fitted parameters.
    """
    return policy.calibrate(model, run, degree)


def recorded_run(model: nn.Module, policy: Policy, run: Callable[[nn.Module], Any]) -> tuple[list[Any], list[torch.Tensor]]:
    """Run ``run`` once through ``model`` compiled with ``policy`` (which should reuse
    nothing): each call's step record and main output tensor."""
    cached = compile_model(model, policy)
    recorder = OutputRecorder(cached)
    with session(cached) as sess, torch.inference_mode():
        run(recorder)
        records = list(sess.stats.records)
    return records, recorder.outputs
