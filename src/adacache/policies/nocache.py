"""NoCache: every eligible block found and outlined, nothing cached (the correctness anchor)."""

from __future__ import annotations

from typing import Any

from ..passes.regions import Region
from .base import Granularity, Policy, SitePlan, check, policy_dataclass


@policy_dataclass
class NoCache(Policy):
    """Pass-through: every eligible block is found and outlined as a site, nothing is cached.

    The rewritten graph computes exactly what the original does (bitwise in float64) and
    keeps no cache state; it is the correctness anchor and measures the cost of capture and
    outlining. To measure caching that keeps its state but skips nothing, use
    ``FORA(interval=1)``.
    """

    granularity: Granularity = "block"

    def __post_init__(self) -> None:
        check(self.granularity in ("block", "module"), "NoCache", f"granularity must be 'block' or 'module', got {self.granularity!r}")

    def plan(self, blocks: list[Region]) -> list[SitePlan]:
        sites = self._per_unit_sites(blocks, "residual" if self.granularity == "block" else "output")
        for site in sites:
            site.role = "fresh"
        return sites

    def schedule(self, site: SitePlan) -> dict[str, Any]:
        return {"kind": "never"}

    @property
    def proposes_reuse(self) -> bool:  # type: ignore[override]
        return False
