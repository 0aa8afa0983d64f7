"""EasyCache: reuse while the drift predicted from the model's own transformation rate stays small."""

from __future__ import annotations

from typing import Any

from ..passes.regions import Region
from ..validate import policy_number
from .base import Policy, SitePlan, TransformationRate, policy_dataclass, rebuild_for, span_label


@policy_dataclass
class EasyCache(Policy):
    """EasyCache (Zhou et al. 2025; survey Eqs. 31-33): runtime-adaptive, no calibration.

    One site over every block. At a full step the blocks' *relative transformation rate*
    ``k = |v_i - v_(i-1)| / |x_i - x_(i-1)|`` is measured (``x`` the blocks' input streams,
    ``v`` their outputs, the previous step's as the blocks returned them); at every step
    the drift ``k * |x_n - x_(n-1)| / |v_(n-1)|`` is added to a running sum (Eq. 33). While
    the sum stays below ``threshold`` the blocks are skipped and the transformation of the
    last full step is applied to the current input (``v = x + (v_i - x_i)``, Eq. 32);
    otherwise they run and the sum restarts. The first step of a request and the step after
    it compute (the rate needs two full steps), and so does every step of the warm-up.

    Args:
        threshold: τ, the drift sum that forces a full step (the reference uses 2-10%:
            ``0.05``).
        warmup: leading steps that always compute (the reference's ``ret_steps``).
    """

    zcache_base = True  # each crossing of the threshold closes a window

    threshold: float = 0.05
    warmup: int = 2

    def __post_init__(self) -> None:
        name = "EasyCache"
        object.__setattr__(self, "threshold", policy_number(name, "threshold", self.threshold, minimum=0, exclusive_minimum=True))
        object.__setattr__(self, "warmup", policy_number(name, "warmup", self.warmup, integer=True, minimum=0))

    def plan(self, blocks: list[Region]) -> list[SitePlan]:
        return [SitePlan(name="site_0", label=span_label(blocks), regions=tuple(blocks), rebuild=rebuild_for("residual"),
                         terms=(TransformationRate(float(self.threshold)),), blocks=tuple(b.name for b in blocks))]

    def schedule(self, site: SitePlan) -> dict[str, Any]:
        return {"kind": "after_warmup", "warmup": self.warmup}
