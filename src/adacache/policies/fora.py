"""FORA: a fixed schedule of full computation every N steps, reuse in between."""

from __future__ import annotations

from typing import Any

from ..passes.regions import Region
from ..stepping import allow_reuse
from ..validate import policy_number
from .base import Granularity, Policy, ReuseForm, ScheduleAnchor, SitePlan, check, check_anchor, policy_dataclass


@policy_dataclass
class FORA(Policy):
    """FORA: compute every block fully once every ``interval`` steps, reuse in between.

    Survey Sec. III-C (Selvaraju et al., 2024). Steps ``0 .. warmup-1`` always compute;
    after that, step ``s`` computes when ``(s - warmup) % interval == 0`` (or, anchored to
    the end of a request of ``T`` steps, when ``(T - 1 - s) % interval == 0``).

    At block granularity all blocks form one cache site (one span): with a schedule shared by
    every block that is the same computation as a site per block, at less cost.

    Args:
        interval: N, the period of full computation (1 = never reuse).
        warmup: leading steps that always compute.
        granularity: ``block`` caches whole blocks; ``module`` caches attention and
            feed-forward outputs and recomputes norms, modulation and residual adds fresh.
        reuse: ``output`` (reuse the stale block output, the default) or ``residual``
            (Δ-DiT: reuse ``block(x) - x`` on the current ``x``). Measured on the reference
            model (BENCHMARKS.md), FORA(interval=3) kept 42.0 dB with output reuse and 38.1 dB
            with residual reuse at the same hit rate, so output is the default here;
            sub-modules always reuse outputs.
        anchor: ``start`` counts the full steps from ``warmup`` (the default); ``end`` counts
            them back from the request's last step, so it ends on a full computation (needs
            the request's length: a pipeline call, ``total_steps=``; otherwise ``start``).
            On the reference model the start anchor kept as much fidelity or more at equal
            computed steps (BENCHMARKS.md, "Where the full steps fall").
    """

    interval: int = 3
    warmup: int = 0
    granularity: Granularity = "block"
    reuse: ReuseForm | None = None
    anchor: ScheduleAnchor = "start"

    def __post_init__(self) -> None:
        # Stored as Python ints: a numpy / torch integer would otherwise reach the schedule and the manifest.
        object.__setattr__(self, "interval", policy_number("FORA", "interval", self.interval, integer=True, minimum=1))
        object.__setattr__(self, "warmup", policy_number("FORA", "warmup", self.warmup, integer=True, minimum=0))
        check(self.granularity in ("block", "module"), "FORA", f"granularity must be 'block' or 'module', got {self.granularity!r}")
        check(self.reuse in (None, "residual", "output"), "FORA", f"reuse must be 'residual' or 'output', got {self.reuse!r}")
        check_anchor("FORA", self.anchor)
        check(
            not (self.granularity == "module" and self.reuse == "residual"),
            "FORA",
            "granularity='module' caches attention / feed-forward outputs, which have no residual form; use reuse='output'",
        )

    def plan(self, blocks: list[Region]) -> list[SitePlan]:
        if self.granularity == "block":
            return self._span_site(blocks, self.reuse or "output")
        return self._per_unit_sites(blocks, "output")

    def schedule(self, site: SitePlan) -> dict[str, Any]:
        return {"kind": "interval", "interval": self.interval, "warmup": self.warmup, "anchor": self.anchor}

    @property
    def proposes_reuse(self) -> bool:  # type: ignore[override]
        return self.interval > 1


def is_fora_reuse_step(step: int, interval: int, warmup: int) -> bool:
    """FORA's schedule: True where step ``step`` reuses the cache."""
    return allow_reuse({"kind": "interval", "interval": interval, "warmup": warmup}, step)


