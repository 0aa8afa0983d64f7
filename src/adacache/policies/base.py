"""The policy interface: what a caching method tells the compiler and the runtime.

A policy answers three questions, each at its own time:

1. *Plan* (compile time, once per captured graph): which regions become cache *sites*,
   at which granularity (whole blocks, or the attention / feed-forward calls inside
   them), how a cached value is reused (the residual a block added, Δ-DiT style, or the
   region's raw output), and which sites are gated by an in-graph score (FirstBlockCache's
   probe, AdaCorrection's offset score).
2. *Schedule* (run time, before each step): for each site, whether reuse is allowed at
   this step at all (FORA's static interval, warm-up steps). This is a host-side bool fed
   to the graph as a 0-d tensor, so it never causes a re-trace.
3. *Decide* (inside the graph): the final reuse predicate combines the schedule, the
   cache's validity and the site's score; the block only runs when the predicate is false.

Methods that keep several tensors per site (TaylorSeer's finite differences) extend the
reuse forms; methods that act on the whole trajectory (Z-Cache) extend the runtime's
sampling loop. Policies are frozen dataclasses validated at construction.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .. import stepping
from ..errors import PolicyError
from ..passes.contract import (  # noqa: F401 - the contract's words, re-exported for policies
    AccumulatedChange,
    Forecast,
    FollowsGate,
    OffsetRule,
    OffsetScore,
    ProbeBelow,
    ReuseForm,
    Role,
    SitePlan,
    TransformationRate,
    rebuild_for,
    span_label,
)
from ..passes.regions import Region

Granularity = Literal["block", "module"]
#: Where a fixed interval schedule counts its full steps from (see :func:`adacache.stepping.allow_reuse`).
ScheduleAnchor = Literal["start", "end"]


@dataclass(frozen=True)
class StepContext:
    """Where the runtime is in a generation when it asks the policy for a schedule.

    ``step`` counts denoising steps from 0; ``slot`` is the call within a step (pipelines
    that run classifier-free guidance as two calls per step have slots 0 and 1);
    ``timestep`` is the model's timestep input when it has one; ``total_steps`` is the
    number of steps the request will run when the runtime knows it (a pipeline call's
    ``num_inference_steps``, or ``new_request(total_steps=...)``), else ``None``; ``fresh_from``
    is the step from which the caches hold anything (0, or 1 when an inferred request
    restarted its caches there).
    """

    step: int
    slot: int = 0
    timestep: float | None = None
    total_steps: int | None = None
    fresh_from: int = 0


def check_anchor(policy: str, anchor: Any) -> None:
    """Refuse an anchor that is not one of :data:`adacache.stepping.SCHEDULE_ANCHORS`."""
    check(anchor in stepping.SCHEDULE_ANCHORS, policy,
          f"anchor must be 'start' (full steps counted from the first) or 'end' (counted back from the last, when the "
          f"request's length is known), got {anchor!r}")


def policy_dataclass(cls: type) -> type:
    """Make ``cls`` a frozen dataclass whose constructor rejects unknown fields with ValueError."""
    cls = dataclass(frozen=True)(cls)
    original_init = cls.__init__
    names = {f.name for f in dataclasses.fields(cls) if f.init}

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise PolicyError(
                f"{cls.__name__} has no parameter(s) {unknown}; valid parameters: {sorted(names)}"
            )
        if len(args) > len(names):
            raise PolicyError(f"{cls.__name__} takes at most {len(names)} positional parameters, got {len(args)}")
        original_init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def check(condition: bool, policy: str, message: str) -> None:
    """Raise :class:`PolicyError` (a ValueError) naming the policy when ``condition`` fails."""
    if not condition:
        raise PolicyError(f"{policy}: {message}")


def weight_signature(model: Any) -> tuple[float, ...] | None:
    """A few numbers that tell one model's weights from another's, to check that parameters
    fitted on one model (calibration) are used on that model.

    For up to 16 weight tensors spread over the model: the sum and the absolute sum of a
    strided sample of 64 elements. Cheap (about 2,000 numbers read), independent of the
    weights' dtype and device, and different for another checkpoint of the same
    architecture. ``None`` when the weights are not materialised (meta tensors).
    """
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2] or list(model.named_parameters())
    if not named or any(p.is_meta for _, p in named):
        return None
    picks = named[:: max(1, len(named) // 16)][:16]
    out: list[float] = []
    with torch.no_grad():
        for _, param in picks:
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float64)
            out += [float(sample.sum()), float(sample.abs().sum())]
    return tuple(out)


def same_weights(fitted: tuple[float, ...], current: tuple[float, ...], rtol: float = 1e-2) -> bool:
    """Whether two :func:`weight_signature` results come from the same weights (any dtype:
    bfloat16 rounds each sampled value by < 0.4%)."""
    if len(fitted) != len(current):
        return False
    for (s0, a0), (s1, a1) in zip(zip(fitted[::2], fitted[1::2]), zip(current[::2], current[1::2])):
        scale = rtol * max(a0, a1) + 1e-12
        if abs(s0 - s1) > scale or abs(a0 - a1) > scale:
            return False
    return True


class Policy:
    """Base of every caching policy. Subclasses are declared with :func:`policy_dataclass`."""

    #: backends that can run the policy's decisions (all graph-level policies run everywhere).
    backends: ClassVar[tuple[str, ...]] = ("eager", "inductor", "onnx", "tensorrt")
    #: True for trajectory-level policies (Z-Cache) that need ``adacache.sample`` to own the loop.
    owns_trajectory: ClassVar[bool] = False
    #: True where Z-Cache may roll back this policy's windows: it forecasts or gates every
    #: block at once, so each full computation closes a window of cached steps.
    zcache_base: ClassVar[bool] = False
    granularity: Granularity = "block"

    # -- what the policy can do, declared here so that no caller lists policy classes --------
    @property
    def proposes_reuse(self) -> bool:
        """Whether the policy's own schedule ever proposes reuse (``FORA(interval=1)`` keeps
        caches but proposes none: a base for a policy that decides alone)."""
        return True

    @property
    def calibratable(self) -> bool:
        """Whether :meth:`calibrate` fits parameters of this policy to a model."""
        return type(self).calibrate is not Policy.calibrate

    def calibrate(self, model: Any, run: Any, degree: int = 4) -> "Policy":
        """A copy with the parameters fitted to ``model`` from one full-computation run
        (``run(denoiser)`` performs one generation); see :func:`adacache.calibrate`."""
        raise PolicyError(f"{type(self).__name__} has nothing to calibrate: its parameters are not fitted to a model")

    def plan(self, blocks: list[Region]) -> list[SitePlan]:
        """Turn the model's eligible blocks into cache sites."""
        raise NotImplementedError

    def schedule(self, site: SitePlan) -> dict[str, Any]:
        """The host-side reuse schedule of ``site`` as a plain spec (see :mod:`adacache.stepping`).

        Being data, not code, it travels in export manifests, so a deployed engine decides
        exactly as the eager model does.
        """
        raise NotImplementedError

    def forecast_basis(self) -> list[list[float]] | None:
        """For a forecasting policy, the coefficient of each stored difference by lag
        (``basis[k][i]``, ``k`` steps after the last full computation), when it is not
        TaylorSeer's ``k**i / i!`` (None). Data, not code, so that it travels in export
        manifests (see :func:`adacache.stepping.forecast_controls`)."""
        return None

    def allow_reuse(self, ctx: StepContext, site: SitePlan) -> bool:
        """Whether ``site`` may reuse its cache at this step (the in-graph checks still apply)."""
        return stepping.allow_reuse(self.schedule(site), ctx.step, ctx.total_steps, ctx.timestep)

    def check_parameters(self) -> None:
        """Check the parameters again, as when the policy was made (raise :class:`PolicyError`).

        Policies are frozen, but ``object.__setattr__`` reaches behind that; ``adacache.compile``
        calls this so that a value changed since construction is refused there, not at a step.
        """
        post_init = getattr(self, "__post_init__", None)
        if post_init is not None:
            post_init()

    def check_model(self, model: Any) -> None:
        """Refuse a model this policy's parameters were not made for (raise :class:`PolicyError`).

        Called once by ``adacache.compile``. Policies whose parameters were fitted on a model
        (calibrated scales) override it; the default accepts any model.
        """

    def describe(self) -> str:
        """``FORA(interval=3, warmup=1)``: the policy and its parameters."""
        params = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr)  # type: ignore[arg-type]
        return f"{type(self).__name__}({params})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, recorded in summaries and export manifests."""
        return {"policy": type(self).__name__, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    # -- helpers for subclasses ---------------------------------------------------------
    def _units(self, blocks: list[Region]) -> list[tuple[str, Region]]:
        """The regions to cache at this policy's granularity, with the block each sits in."""
        if self.granularity == "block":
            return [(b.name, b) for b in blocks]
        units = [(b.name, sub) for b in blocks for sub in b.submodules]
        if not units:
            raise PolicyError(
                f"{type(self).__name__}(granularity='module') found no attention or feed-forward "
                "sub-modules inside the blocks; use granularity='block'"
            )
        return units

    def _span_site(self, blocks: list[Region], reuse: ReuseForm) -> list[SitePlan]:
        """One site over every block, for policies whose schedule is the same for all blocks.

        Reusing a span is the same computation as reusing each block of it: stale outputs
        chain to the last block's stale output, and residuals telescope to the span's
        residual (and so do their Taylor forecasts, which are linear). One decision per step
        instead of one per block, and one cache tensor per stream instead of one per block.
        """
        return [SitePlan(name="site_0", label=span_label(blocks), regions=tuple(blocks), rebuild=rebuild_for(reuse),
                         blocks=tuple(b.name for b in blocks))]

    def _per_unit_sites(self, blocks: list[Region], reuse: ReuseForm) -> list[SitePlan]:
        return [
            SitePlan(name=f"site_{i}", label=region.name, regions=(region,), rebuild=rebuild_for(reuse), blocks=(block,))
            for i, (block, region) in enumerate(self._units(blocks))
        ]
