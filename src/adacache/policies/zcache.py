"""Z-Cache: self-reflection over each caching window (z-cache.txt, Sec. 3.3 and Fig. 3)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from ..errors import PolicyError
from ..passes.regions import Region
from .base import Policy, SitePlan, StepContext, check, policy_dataclass
from .taylorseer import TaylorSeer  # the default base


def reflection_weight(k: int, t1: int, t2: int, kind: str = "log") -> float:
    """Weight of the *new* anchor's forecast at step ``k`` of a window, ``t1 < k <= t2``.

    Steps are counted as the sampler runs (``t1`` the earlier full computation, ``t2`` the new
    one). The paper writes its logarithmic weight in diffusion timesteps, which run the other
    way: ``w = log(T2 - K + 1) / log(T2 - T1 + 1)`` for ``T1 <= K < T2``, where ``T1`` is the
    timestep of the *new* full computation and ``T2`` that of the earlier one (its Fig. 3: the
    window after timestep ``t`` is recomputed at ``t-1 .. t-n`` with ``t-n`` the new anchor).
    In steps, ``T2 - K = k - t1`` and ``T2 - T1 = t2 - t1``:

        w = log(k - t1 + 1) / log(t2 - t1 + 1)

    1 at the new anchor and falling towards the earlier one, whose own forecast gets ``1 - w``.
    With ``kind="linear"``, ``w = (k - t1) / (t2 - t1)``: the share of the window already
    crossed, which the logarithm front-loads (at the middle of a 20-step window it gives the
    new anchor 0.79).
    """
    if not t1 < k <= t2:
        raise ValueError(f"k={k} outside the window ({t1}, {t2}]")
    if kind == "linear":
        return (k - t1) / (t2 - t1)
    if kind != "log":
        raise ValueError(f"kind must be 'log' or 'linear', got {kind!r}")
    return math.log(k - t1 + 1) / math.log(t2 - t1 + 1)


@policy_dataclass
class ZCache(Policy):
    """Z-Cache over TaylorSeer or TeaCache: after each full computation, re-run the window behind it.

    Forward with the base's forecasts until the next full computation at step ``t2``; then
    roll the sampler back to the previous anchor ``t1``, re-predict every intermediate step
    ``t1 < k < t2`` as ``(1 - w) F_{A}(k) + w F_{A + t2}(k)`` (``w`` the logarithmic weight of
    :func:`reflection_weight`, largest near the new anchor), re-run the sampler over the window with those features (only
    the non-block part of the network runs), and take step ``t2`` on the re-sampled latent
    with the new anchor's features, without another full computation.

    Reflection rewrites the trajectory, so this policy needs the runtime to own the loop:
    use :func:`adacache.sample`. Calling the compiled model directly runs the base alone.

    A window ends wherever the base computed every block: at TaylorSeer's fixed interval, or
    wherever TeaCache's accumulated change crossed its threshold (the runtime reads it from
    what the step did). With TeaCache the anchors' features are the cached residuals
    themselves (no forecast), blended by the same weight.

    The window that closes at the sampler's *final* step is not reflected by default: on the
    reference model the features of the last step are so unlike the steps before it that
    blending them back into the window spoils the end of the trajectory (BENCHMARKS.md study:
    TaylorSeer(order=1, interval=3) 43.3 dB alone, 31.3 dB with that window reflected, 44.0 dB
    without it; see docs/findings.md). Reflection needs forecasts that follow the
    drift: over plain reuse (``TaylorSeer(order=0, reuse="output")``, FORA's form) the
    logarithmic weight pulls each window towards the new anchor long before the features get
    there (a 20-sample scan at interval 8, not part of BENCHMARKS.md: 8.6 dB against FORA's
    31.0), and over long TeaCache windows the same happens (``weight="linear"`` is gentler;
    the TeaCache rows are in BENCHMARKS.md).

    Args:
        base: TaylorSeer (static windows) or TeaCache (adaptive windows).
        reflect_final_window: also reflect the window whose new anchor is the last step.
        weight: ``"log"``, the paper's logarithmic weight, or ``"linear"`` (see
            :func:`reflection_weight`).
    """

    base: Policy = dataclasses.field(default_factory=lambda: TaylorSeer(order=1, interval=5))
    reflect_final_window: bool = False
    weight: Literal["log", "linear"] = "log"
    backends = ("eager", "inductor")  # the trajectory roll-back cannot live inside one engine
    #: the runtime must own the denoising loop (``adacache.sample``)
    owns_trajectory = True

    def __post_init__(self) -> None:
        check(isinstance(self.base, Policy), "ZCache", f"base must be a policy, got {self.base!r}")
        check(isinstance(self.reflect_final_window, bool), "ZCache",
              f"reflect_final_window must be a bool, got {self.reflect_final_window!r}")
        check(self.weight in ("log", "linear"), "ZCache", f"weight must be 'log' or 'linear', got {self.weight!r}")
        if not (isinstance(self.base, Policy) and self.base.zcache_base):
            raise PolicyError(
                f"ZCache(base={type(self.base).__name__}) is not supported: reflection re-predicts a window's "
                "features from the anchors at both ends; use ZCache(base=TaylorSeer(...)) or ZCache(base=TeaCache(...))"
            )

    @property
    def granularity(self) -> str:  # type: ignore[override]
        return self.base.granularity

    def plan(self, blocks: list[Region]) -> list[SitePlan]:
        return self.base.plan(blocks)

    def check_model(self, model: Any) -> None:
        self.base.check_model(model)

    def forecast_basis(self) -> list[list[float]] | None:
        return self.base.forecast_basis()

    def schedule(self, site: SitePlan) -> dict[str, Any]:
        return self.base.schedule(site)

    def allow_reuse(self, ctx: StepContext, site: SitePlan) -> bool:
        return self.base.allow_reuse(ctx, site)
