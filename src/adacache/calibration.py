"""Fit model-specific policy parameters from one full-computation run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .api import compile as compile_model
from .api import session
from .errors import PolicyError
from .policies.teacache import TeaCache


class _Recorder(nn.Module):
    """Passes calls through to the cached model and keeps each call's main output tensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.outputs: list[torch.Tensor] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        leaf = out if isinstance(out, torch.Tensor) else (out[0] if isinstance(out, (tuple, list)) else out.sample)
        self.outputs.append(leaf.detach().float().clone())
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


def calibrate(model: nn.Module, policy: TeaCache, run: Callable[[nn.Module], Any], degree: int = 4) -> TeaCache:
    """Fit TeaCache's rescaling polynomial on ``model`` and return the policy with it.

    ``run(denoiser)`` must perform one generation with full computation semantics (for
    example ``lambda d: sample(d, labels, num_steps=50)``); the denoiser it receives
    computes every block while recording, per step, the relative L1 change of the
    modulated input (TeaCache's signal, x) and of the model output (what it should
    predict, y). ``numpy.polyfit(x, y, degree)`` gives the coefficients, stored on the
    returned policy (highest degree first).
    """
    if not isinstance(policy, TeaCache):
        raise PolicyError(f"calibrate fits TeaCache's coefficients; got {type(policy).__name__}")
    probe = TeaCache(threshold=policy.threshold, coefficients=(1.0, 0.0), warmup=2**31 - 1)  # never reuse
    cached = compile_model(model, probe)
    recorder = _Recorder(cached)
    with session(cached) as sess, torch.inference_mode():
        run(recorder)
        records = list(sess.stats.records)
    xs, ys = [], []
    last: dict[int, tuple[int, torch.Tensor]] = {}
    for rec, out in zip(records, recorder.outputs):
        if rec.slot in last and rec.step == last[rec.slot][0] + 1:
            prev = last[rec.slot][1]
            xs.append(float(rec.scores["site_0"]))
            ys.append(float((out - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)))
        last[rec.slot] = (rec.step, out)
    if len(xs) <= degree:
        raise PolicyError(f"calibration saw {len(xs)} step pairs, fewer than needed for a degree-{degree} fit; run more steps")
    coefficients = np.polyfit(np.asarray(xs), np.asarray(ys), degree)
    return dataclasses.replace(policy, coefficients=tuple(float(c) for c in coefficients))
