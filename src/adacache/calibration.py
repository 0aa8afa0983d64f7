"""Fit model-specific policy parameters from one full-computation run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from . import ops
from .api import compile as compile_model
from .api import session
from .errors import PolicyError
from .passes.contract import SitePlan
from .policies.base import Policy
from .runtime.module import Runtime
from .stepping import StepTracker

if TYPE_CHECKING:
    from .policies.adacorrection import AdaCorrection


class OutputRecorder(nn.Module):
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


def calibrate(model: nn.Module, policy: Policy, run: Callable[[nn.Module], Any], degree: int = 4) -> Policy:
    """Fit a policy's model-specific parameters from one full-computation run of ``model``.

    ``run(denoiser)`` must perform one generation (for example
    ``lambda d: sample(d, labels, num_steps=50)``); the denoiser it receives computes every
    block while recording. Each policy says what it fits (:meth:`Policy.calibrate`); today:

    * :class:`TeaCache`: the rescaling polynomial (``degree``) that maps the change of the
      first block's modulated input to the change of the model output;
    * :class:`AdaCorrection`: one scale per cached unit, so that ``scale * S`` estimates the
      relative error of reusing that unit's cache (see :func:`fit_offset_scales`); a base
      that can be calibrated is fitted first, with the same run.

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


class _UnitRecorder(nn.Module):
    """Runs the original model with full computation and, per call, compares every cached
    unit's input and output with those of the same call slot one step earlier.

    Only the previous step is kept (per slot and unit), so memory does not grow with the
    number of steps.
    """

    def __init__(self, model: nn.Module, policy: AdaCorrection, planner: Runtime) -> None:
        super().__init__()
        self.model = model
        self.policy = policy
        self.planner = planner
        self.tracker = StepTracker()
        self.tracker.begin_request()  # the run starts a request; later ones are inferred
        self.sites: list[SitePlan] = []
        self.hooks: list[Any] = []
        self.previous: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.pairs: dict[str, list[tuple[float, float]]] = {}
        self.entering: dict[str, torch.Tensor | None] = {}  # a unit's input, between its pre-hook and its hook
        self._slot = 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.sites:
            self._attach(self.planner.prepare(*args, **kwargs))
        self.tracker.advance(self.planner.timestep_of(args, kwargs))
        self._slot = self.tracker.slot
        if self.tracker.step == 0:
            self.previous = {k: v for k, v in self.previous.items() if k[0] != self._slot}
        return self.model(*args, **kwargs)

    def _attach(self, program: Any) -> None:
        self.sites = program.cached_sites
        for site in self.sites:
            # A span (AdaCorrection(unit="span")) is scored from its first block's input and
            # judged on its last block's output; any other unit is one submodule.
            span = len(site.blocks) > 1
            name = site.label if span else site.regions[0].name
            first, last = (site.blocks[0], site.blocks[-1]) if span else (name, name)
            try:
                modules = [self.model.get_submodule(first), self.model.get_submodule(last)]
            except AttributeError as exc:
                raise PolicyError(
                    f"calibrating AdaCorrection needs each cached unit to be a submodule; {first!r} or {last!r} is not one of "
                    f"{type(self.model).__name__}'s submodules"
                ) from exc
            self.pairs[name] = []
            self.hooks.append(modules[0].register_forward_pre_hook(self._entry(name), with_kwargs=True))
            self.hooks.append(modules[1].register_forward_hook(self._hook(name, site.reuse, site.regions[0].is_residual), with_kwargs=True))

    def _entry(self, name: str) -> Callable[..., None]:
        def remember(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.entering[name] = _stream_input(args, kwargs)

        return remember

    def _hook(self, name: str, reuse: str, residual_unit: bool) -> Callable[..., None]:
        lam = self.policy.lam if self.policy.score == "paper" else 0.0

        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = self.entering.pop(name, None)
            y = _stream_output(output, x)
            if x is None or y is None:
                raise PolicyError(f"calibrating AdaCorrection: {name} has no tensor input or output to compare")
            x, y = x.detach().float(), y.detach().float()
            key = (self._slot, name)
            if key in self.previous and self.previous[key][0].shape == x.shape:
                x_prev, y_prev = self.previous[key]
                score = float(ops.adacorrection_score(x, x_prev, lam).max())  # worst item, as the graph decides
                self.pairs[name].append((score, _reuse_error(x, y, x_prev, y_prev, reuse, residual_unit)))
            self.previous[key] = (x.clone(), y.clone())

        return record

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _stream_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    value = kwargs.get("hidden_states")
    if isinstance(value, torch.Tensor):
        return value
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


def _stream_output(output: Any, like: torch.Tensor | None) -> torch.Tensor | None:
    """The unit's output on the same stream as its input (a joint block returns two)."""
    tensors = [output] if isinstance(output, torch.Tensor) else [o for o in (output if isinstance(output, (tuple, list)) else ()) if isinstance(o, torch.Tensor)]
    if like is not None:
        same = [t for t in tensors if t.shape == like.shape]
        if same:
            return same[-1]
    return tensors[0] if tensors else None


def _reuse_error(x: torch.Tensor, y: torch.Tensor, x_prev: torch.Tensor, y_prev: torch.Tensor, reuse: str, residual_unit: bool) -> float:
    """Relative error of reusing the previous step's cache now, worst batch item:
    ``||reused - y|| / ||y - x||`` for a residual unit (relative to what the unit adds), with
    ``reused`` the stale output or the current input plus the stale residual; for other
    units (attention / feed-forward calls) relative to ``||y||``."""
    reused = y_prev if reuse == "output" else x + (y_prev - x_prev)
    dims = tuple(range(1, y.dim()))
    scale = y - x if residual_unit else y
    err = torch.linalg.vector_norm(reused - y, dim=dims) / torch.linalg.vector_norm(scale, dim=dims).clamp_min(1e-12)
    return float(err.max())


def fit_offset_scales(model: nn.Module, policy: AdaCorrection, run: Callable[[nn.Module], Any]) -> dict[str, float]:
    """Per cached unit, the factor that turns its offset score into an estimate of its reuse error.

    One full-computation run records, for every unit and every pair of consecutive steps,
    the offset score ``S`` of the unit's input against the previous step's (the score the
    policy computes) and the true relative error of reusing the previous step's cache in the
    unit's reuse form. The scale is the median of ``error / S``. On the reference model this
    lifts the rank correlation of score and error within a step, across blocks, from +0.14 to
    +0.48 (residual reuse) and from +0.40 to +0.67 (output reuse) on held-out seeds
    (BENCHMARKS.md), because blocks differ several-fold in how much error a given input drift
    causes.
    """
    planner = compile_model(model, dataclasses.replace(policy, scales={})).adacache
    recorder = _UnitRecorder(model, policy, planner)
    try:
        with torch.inference_mode():
            run(recorder)
    finally:
        recorder.close()
    if not recorder.sites:
        raise PolicyError("calibration saw no model call: run(denoiser) must call the denoiser it is given")
    scales = {}
    for name, pairs in recorder.pairs.items():
        if pairs and all(s <= 1e-12 for s, _ in pairs) and any(e > 1e-6 for _, e in pairs):
            raise PolicyError(
                f"the offset score of {name} was 0 at every step while reusing its cache changed its output: its "
                "input does not move between steps (what changes is another input, e.g. the timestep embedding), "
                "so AdaCorrection's score cannot judge it; use TeaCache, whose signal is the modulated input"
            )
        ratios = [e / s for s, e in pairs if s > 1e-12 and np.isfinite(s) and np.isfinite(e)]
        if len(ratios) < 2:
            raise PolicyError(f"calibration saw {len(ratios)} usable step pairs for {name}; run at least 3 steps")
        scales[name] = float(np.median(ratios))
    return scales
