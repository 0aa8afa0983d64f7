"""TaylorSeer: forecast cached features with a Taylor expansion instead of reusing them."""

from __future__ import annotations

from typing import Any

from ..passes.regions import Region
from ..validate import policy_number
from .base import Granularity, Policy, ReuseForm, ScheduleAnchor, SitePlan, check, check_anchor, policy_dataclass, rebuild_for


@policy_dataclass
class TaylorSeer(Policy):
    """Cache-then-forecast (Liu et al. 2025; survey Eq. 42).

    Every ``interval`` steps the cached units compute fully and refresh their stored value
    and its finite differences up to ``order``; in between, each unit's value is forecast as
    ``F + sum_i D_i k^i / i!`` (``k`` steps since the last full computation) and the unit
    does not run. Memory: ``order + 1`` tensors per cached output.

    Args:
        order: m, the Taylor order (0 is plain reuse, i.e. FORA).
        interval: N, full computation every N steps.
        warmup: leading steps that always compute (the first differences need them).
        granularity: ``block`` (block residuals, the default: on the reference model order 1,
            interval 5 kept 37.6 dB at 4.24x with blocks and 36.7 dB at 2.23x with modules, see
            docs/findings.md) or ``module`` (attention / feed-forward outputs).
        reuse: ``output`` or ``residual``; default: residual for blocks, output for modules.
        anchor: ``start`` (the default) or ``end``: where the full steps are counted from, as
            in :class:`~adacache.FORA`. Anchored to the end, the first window after the
            warm-up may be forecast from a single full step (order 0); on the reference model
            that cost 2.1-2.2 dB at interval 5 over 50 steps (BENCHMARKS.md).
    """

    zcache_base = True  # each full computation at its interval closes a window

    order: int = 1
    interval: int = 5
    warmup: int = 1
    granularity: Granularity = "block"
    reuse: ReuseForm | None = None
    anchor: ScheduleAnchor = "start"

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "order", policy_number(name, "order", self.order, integer=True, minimum=0, maximum=4))
        object.__setattr__(self, "interval", policy_number(name, "interval", self.interval, integer=True, minimum=1))
        object.__setattr__(self, "warmup", policy_number(name, "warmup", self.warmup, integer=True, minimum=0))
        check(self.granularity in ("block", "module"), name, f"granularity must be 'block' or 'module', got {self.granularity!r}")
        check(self.reuse in (None, "residual", "output"), name, f"reuse must be 'residual' or 'output', got {self.reuse!r}")
        check_anchor(name, self.anchor)
        check(not (self.granularity == "module" and self.reuse == "residual"), name, "module outputs have no residual form; use reuse='output'")

    def plan(self, blocks: list[Region]) -> list[SitePlan]:
        if self.granularity == "block":
            sites = self._span_site(blocks, self.reuse or "residual")
        else:
            sites = self._per_unit_sites(blocks, self.reuse or "output")
        for site in sites:
            site.rebuild = rebuild_for(site.reuse, self.order)
        return sites

    def schedule(self, site: SitePlan) -> dict[str, Any]:
        return {"kind": "interval", "interval": self.interval, "warmup": self.warmup, "anchor": self.anchor}

    @property
    def proposes_reuse(self) -> bool:  # type: ignore[override]
        return self.interval > 1
