"""FirstBlockCache (ParaAttention FBCache / cache-dit DBCache ``Fn``/``Bn``)."""

from __future__ import annotations

from typing import Any

from ..errors import PolicyError
from ..passes.regions import Region
from ..validate import policy_number
from .base import Policy, ProbeBelow, ReuseForm, SitePlan, check, policy_dataclass, rebuild_for, span_label


@policy_dataclass
class FirstBlockCache(Policy):
    """The first blocks always run as a probe; their residual's change gates the rest.

    At each step the first ``probe_blocks`` blocks compute. The relative L1 change of their
    residual against the residual stored at the last full step (``offset_score``) is
    compared with ``threshold``: below it, the middle blocks are skipped and their cached
    residual is added to the current stream; the last ``tail_blocks`` blocks always
    compute (DBCache's ``Bn``). The score is taken per batch item and the batch reuses only
    when every item passes.

    Args:
        threshold: relative L1 change below which the middle blocks are reused, in (0, 10].
        probe_blocks: Fn, the number of leading blocks that always compute (>= 1).
        tail_blocks: Bn, the number of trailing blocks that always compute (>= 0).
        warmup: leading steps that always compute.
        reuse: ``residual`` (default) or ``output``.
    """

    threshold: float = 0.08
    probe_blocks: int = 1
    tail_blocks: int = 0
    warmup: int = 0
    reuse: ReuseForm = "residual"

    def __post_init__(self) -> None:
        name = "FirstBlockCache"
        object.__setattr__(self, "threshold", policy_number(name, "threshold", self.threshold, minimum=0, maximum=10, exclusive_minimum=True))
        object.__setattr__(self, "probe_blocks", policy_number(name, "probe_blocks", self.probe_blocks, integer=True, minimum=1))
        object.__setattr__(self, "tail_blocks", policy_number(name, "tail_blocks", self.tail_blocks, integer=True, minimum=0))
        object.__setattr__(self, "warmup", policy_number(name, "warmup", self.warmup, integer=True, minimum=0))
        check(self.reuse in ("residual", "output"), name, f"reuse must be 'residual' or 'output', got {self.reuse!r}")

    def plan(self, blocks: list[Region]) -> list[SitePlan]:
        n = len(blocks)
        middle = blocks[self.probe_blocks : n - self.tail_blocks]
        if not middle:
            raise PolicyError(
                f"FirstBlockCache(probe_blocks={self.probe_blocks}, tail_blocks={self.tail_blocks}) leaves no block "
                f"to cache in a model with {n} eligible blocks; lower probe_blocks or tail_blocks"
            )
        probe = tuple(blocks[: self.probe_blocks])
        return [
            SitePlan(name="site_0", label=span_label(probe), regions=probe, role="probe", rebuild=rebuild_for("residual"),
                     blocks=tuple(b.name for b in probe)),
            SitePlan(name="site_1", label=span_label(middle), regions=tuple(middle), rebuild=rebuild_for(self.reuse),
                     terms=(ProbeBelow("site_0", float(self.threshold)),), blocks=tuple(b.name for b in middle)),
        ]

    def schedule(self, site: SitePlan) -> dict[str, Any]:
        return {"kind": "after_warmup", "warmup": self.warmup}
