"""AdaCorrection: adaptive offset cache correction on top of a base policy (adacorrection.txt, Sec. IV)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .. import ops

from ..errors import PolicyError
from ..passes.regions import Region
from ..stepping import StepTracker
from ..validate import policy_number
from .base import (
    AccumulatedChange,
    FollowsGate,
    OffsetRule,
    OffsetScore,
    Policy,
    StepContext,
    SitePlan,
    check,
    policy_dataclass,
    rebuild_for,
    same_weights,
    span_label,
    weight_signature,
)
from .first_block import FirstBlockCache
from .nocache import NoCache


@policy_dataclass
class AdaCorrection(Policy):
    """The base proposes, the offset score of each cached unit's input decides.

    Offset Estimation Module (Eqs. 1-3), per cached unit and step, from the unit's *input*
    (no block compute): ``S = temporal + lam * spatial``, both terms normalised by the mean
    token norm of the input cached at the last full step (see
    :func:`adacache.ops.adacorrection_terms`). Adaptive Correction Module: ``w = clip(gamma S,
    0, 1)`` (Eq. 6). A unit reuses its cache when the base proposes it and ``w < veto``, or
    whenever ``w < accept``; otherwise it runs, and with ``band=True`` its fresh output is
    blended with the corrected cache, ``(1 - w) cached + w fresh`` (Eq. 7).

    Unlike Algorithm 1 as printed, which computes every block at every step, a reused
    unit does not run: that is where the speed comes from.

    Args:
        base: the policy that proposes reuse (FORA, FirstBlockCache, TaylorSeer, ...). Its
            spans are split into single units so that each gets its own decision.
        gamma: sensitivity of the correction weight (paper default 1).
        lam: weight of the spatial term (paper default 1); ``score="temporal"`` ignores it.
        score: ``temporal`` (Eq. 1 alone; measured to track the reuse error, see BENCHMARKS.md)
            or ``paper`` (Eq. 3 with the spatial term).
        accept: reuse regardless of the base below this weight (0 disables).
        veto: refuse the base's reuse at or above this weight (1 keeps every proposal).
        band: blend computed outputs with the corrected cache (Eq. 7).
        scales: per cached unit (by module name), the factor that turns its score into an
            estimate of the relative error of reusing its cache; fitted from one full run by
            ``adacache.calibrate(model, AdaCorrection(...), run)``. Empty: every unit uses 1.
            With scales, ``w`` reads as "predicted relative reuse error", so ``veto`` and
            ``accept`` are error tolerances.
        reuse: ``residual`` reuses every unit's cache in the offset-corrected form (its
            residual added to the current input), as the paper does; ``base`` keeps the
            base's form (FORA reuses stale outputs by default).
        unit: ``block`` decides for each block (the paper's per-layer weight); ``span``
            keeps a span the base caches as one (FORA, TaylorSeer, TeaCache and
            FirstBlockCache cache all their blocks as one span) and decides once per step
            from the span's input, so the decision costs one score per step instead of one
            per block (see docs/findings.md for what each measured).
    """

    base: Policy = dataclasses.field(default_factory=lambda: FirstBlockCache(0.08))
    gamma: float = 1.0
    lam: float = 1.0
    score: Literal["temporal", "paper"] = "temporal"
    accept: float = 0.0
    veto: float = 0.2
    band: bool = False
    # Not part of the hash (a dict is unhashable); __post_init__ keeps a private copy.
    scales: dict[str, float] = dataclasses.field(default_factory=dict, hash=False)
    reuse: Literal["residual", "base"] = "residual"
    unit: Literal["block", "span"] = "block"
    # Set by adacache.calibrate: the weights the scales were fitted on (see check_model).
    calibrated_on: tuple[float, ...] | None = dataclasses.field(default=None, repr=False, hash=False, compare=False)

    def __post_init__(self) -> None:
        name = "AdaCorrection"
        check(isinstance(self.base, Policy) and not isinstance(self.base, AdaCorrection), name, f"base must be a policy other than AdaCorrection, got {self.base!r}")
        # A trajectory policy acts in adacache.sample's loop, around the calls AdaCorrection
        # corrects; AdaCorrection's own loop is the model call, so the reflection would never run.
        check(not self.base.owns_trajectory, name, f"base={type(self.base).__name__}(...) rewrites the sampling trajectory, "
              "which AdaCorrection (a per-call policy) cannot compose with: use the trajectory policy alone, or AdaCorrection "
              "over its own base (e.g. base=TaylorSeer(...))")
        check(not isinstance(self.base, NoCache), name, "base=NoCache() keeps no cache to reuse; for AdaCorrection's own "
              "decisions alone use base=FORA(interval=1) (caches every step, proposes no reuse) with accept > 0")
        object.__setattr__(self, "gamma", policy_number(name, "gamma", self.gamma, minimum=0, exclusive_minimum=True))
        object.__setattr__(self, "lam", policy_number(name, "lam", self.lam, minimum=0))
        check(self.score in ("temporal", "paper"), name, f"score must be 'temporal' or 'paper', got {self.score!r}")
        object.__setattr__(self, "accept", policy_number(name, "accept", self.accept, minimum=0, maximum=1))
        object.__setattr__(self, "veto", policy_number(name, "veto", self.veto, minimum=0, maximum=1, exclusive_minimum=True))
        check(self.accept <= self.veto, name, f"accept ({self.accept}) must not exceed veto ({self.veto})")
        check(isinstance(self.band, bool), name, f"band must be a bool, got {self.band!r}")
        check(
            isinstance(self.scales, dict) and all(isinstance(k, str) for k in self.scales),
            name, f"scales must map module names to positive numbers (see adacache.calibrate), got {self.scales!r}",
        )
        object.__setattr__(self, "scales", {
            k: policy_number(name, f"scales[{k!r}]", v, minimum=0, exclusive_minimum=True) for k, v in self.scales.items()
        })
        check(self.reuse in ("residual", "base"), name, f"reuse must be 'residual' or 'base', got {self.reuse!r}")
        check(self.unit in ("block", "span"), name, f"unit must be 'block' or 'span', got {self.unit!r}")
        if self.calibrated_on is not None:
            check(isinstance(self.calibrated_on, (tuple, list)), name,
                  f"calibrated_on is set by adacache.calibrate (a weight signature) or None, got {self.calibrated_on!r}")
            object.__setattr__(self, "calibrated_on", tuple(
                policy_number(name, "calibrated_on[i]", v) for v in self.calibrated_on))

    def check_model(self, model: Any) -> None:
        """Scales fitted on one model say nothing about another with the same block names."""
        self.base.check_model(model)
        if not self.scales or self.calibrated_on is None:
            return  # raw scores, or scales given by hand: the user's choice
        current = weight_signature(model)
        if current is not None and not same_weights(self.calibrated_on, current):
            raise PolicyError(
                f"AdaCorrection's scales were calibrated on another model than this {type(model).__name__} "
                "(same block names, other weights): re-run adacache.calibrate on this model, or pass "
                "dataclasses.replace(policy, calibrated_on=None) to use these scales anyway"
            )

    @property
    def granularity(self) -> str:  # type: ignore[override]
        return self.base.granularity

    @property
    def backends(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.base.backends

    def plan(self, blocks: list[Region]) -> list[SitePlan]:
        rule = OffsetRule(
            gamma=float(self.gamma),
            lam=float(self.lam) if self.score == "paper" else 0.0,
            accept=float(self.accept),
            veto=float(self.veto),
            band=bool(self.band),
        )
        planned = self.base.plan(blocks)
        sites: list[SitePlan] = []
        for site in planned:
            if site.role != "cached":
                sites.append(site)
                continue
            if self.unit == "span":  # one decision for the whole span, from its input
                residual = all(r.is_residual for r in site.regions)
                reuse = "residual" if self.reuse == "residual" and residual else site.reuse
                scaled = dataclasses.replace(rule, gamma=rule.gamma * self._scale(site.label))
                sites.append(dataclasses.replace(site, rebuild=rebuild_for(reuse, site.order), terms=(*site.terms, OffsetScore(scaled))))
                continue
            gate = site.term(AccumulatedChange)
            for k, region in enumerate(site.regions):  # one decision per unit
                unit_rule = dataclasses.replace(rule, gamma=rule.gamma * self._scale(region.name))
                terms = site.terms
                if gate is not None and k > 0:
                    # A TeaCache span: the first unit keeps the gate (its probe sits in that
                    # unit), the others follow its verdict.
                    terms = tuple(t for t in terms if t is not gate) + (FollowsGate(site.name, gate.threshold),)
                # The offset-corrected form (the residual added to the current input) needs a
                # residual stream; with a stale *output* the next unit receives exactly its
                # cached input, its score reads 0 and the decision cascades from the first unit.
                reuse = "residual" if self.reuse == "residual" and region.is_residual else site.reuse
                sites.append(dataclasses.replace(site, label=span_label([region]), regions=(region,), blocks=(region.name,),
                                                 rebuild=rebuild_for(reuse, site.order), terms=(*terms, OffsetScore(unit_rule))))
        renamed: dict[str, str] = {}
        for i, site in enumerate(sites):
            if site.role == "probe" or site.term(AccumulatedChange) is not None:
                renamed[site.name] = f"site_{i}"  # first of its name: the probe, or the unit with the gate
            site.name = f"site_{i}"
        for site in sites:
            site.renamed_sites(renamed)
        return sites

    @property
    def calibrated(self) -> bool:
        """Whether per-unit scales were fitted (:func:`adacache.calibrate`)."""
        return bool(self.scales)

    def _scale(self, unit: str) -> float:
        if not self.scales:
            return 1.0
        if unit not in self.scales:
            raise PolicyError(
                f"AdaCorrection was calibrated for units {sorted(self.scales)} but this model has {unit!r}: "
                "re-run adacache.calibrate on this model (or pass scales={} to use the raw score)"
            )
        return self.scales[unit]

    def forecast_basis(self) -> list[list[float]] | None:
        return self.base.forecast_basis()

    def schedule(self, site: SitePlan) -> dict[str, Any]:
        return self.base.schedule(site)

    def allow_reuse(self, ctx: StepContext, site: SitePlan) -> bool:
        # The base's own decision, whatever it reads (a schedule spec, or the request's length).
        return self.base.allow_reuse(ctx, site)

    def calibrate(self, model: Any, run: Any, degree: int = 4) -> "AdaCorrection":
        """One scale per cached unit, so that ``scale * S`` estimates the relative error of
        reusing that unit's cache (:func:`fit_offset_scales`); a base
        that can be calibrated is fitted first, with the same run."""
        policy = dataclasses.replace(self, base=self.base.calibrate(model, run, degree)) if self.base.calibratable else self
        return dataclasses.replace(policy, scales=fit_offset_scales(model, policy, run), calibrated_on=weight_signature(model))


# -- calibration: a scale per unit from one full-computation run -----------------------------

class _UnitRecorder(nn.Module):
    """Runs the original model with full computation and, per call, compares every cached
    unit's input and output with those of the same call slot one step earlier.

    Only the previous step is kept (per slot and unit), so memory does not grow with the
    number of steps.
    """

    def __init__(self, model: nn.Module, policy: AdaCorrection, planner: Any) -> None:
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
        if self.tracker.step == self.tracker.fresh_from:  # a request (or its restart) begins: no pair across it
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
    from ..api import compile as compile_model  # the policy is compiled like any other

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
