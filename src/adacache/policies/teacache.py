"""TeaCache: reuse while the accumulated, rescaled change of the modulated input stays small."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import PolicyError
from ..passes.regions import Region
from ..validate import policy_number, policy_numbers
from .base import AccumulatedChange, Policy, SitePlan, policy_dataclass, rebuild_for, span_label


@policy_dataclass
class TeaCache(Policy):
    """TeaCache (Liu et al. 2024; survey Eqs. 22-24).

    At every step the timestep-modulated input of the first block (the input of its first
    attention) is computed cheaply in front of the blocks; its relative L1 change since the
    previous step is rescaled by a polynomial and added to a running sum. While the sum
    stays below ``threshold`` all blocks are skipped and their cached residual is added to
    the current input; otherwise they run and the sum restarts at 0.

    Args:
        threshold: δ in Eq. 24.
        coefficients: the rescaling polynomial, highest degree first (``numpy.polyval``
            order). The default ``(1.0, 0.0)`` is the identity; fit model-specific ones
            with :func:`adacache.calibrate`.
        warmup: leading steps that always compute.
    """

    zcache_base = True  # each crossing of the threshold closes a window

    threshold: float = 0.1
    coefficients: tuple[float, ...] = (1.0, 0.0)
    warmup: int = 1

    def __post_init__(self) -> None:
        name = "TeaCache"
        object.__setattr__(self, "threshold", policy_number(name, "threshold", self.threshold, minimum=0, exclusive_minimum=True))
        # A NaN coefficient makes every rescaled change NaN, which never crosses the threshold
        # comparison the right way: refused here rather than silently never reusing.
        object.__setattr__(self, "coefficients", policy_numbers(name, "coefficients", self.coefficients))
        object.__setattr__(self, "warmup", policy_number(name, "warmup", self.warmup, integer=True, minimum=0))

    @property
    def calibrated(self) -> bool:
        """Whether the coefficients differ from the identity default (:func:`adacache.calibrate`)."""
        return self.coefficients != (1.0, 0.0)

    def plan(self, blocks: list[Region]) -> list[SitePlan]:
        first = blocks[0]
        if not first.submodules or not first.submodules[0].inputs:
            raise PolicyError(
                f"TeaCache needs the modulated input of the first block ({first.name}), the input of its "
                "first attention call, and found no attention sub-module there; use FirstBlockCache instead"
            )
        attention = first.submodules[0]
        probe = next(n for n in attention.inputs if n in set(first.nodes))
        return [SitePlan(name="site_0", label=span_label(blocks), regions=tuple(blocks), rebuild=rebuild_for("residual"),
                         terms=(AccumulatedChange(probe, tuple(self.coefficients), float(self.threshold)),),
                         blocks=tuple(b.name for b in blocks))]

    def schedule(self, site: SitePlan) -> dict[str, Any]:
        return {"kind": "after_warmup", "warmup": self.warmup}

    def calibrate(self, model: Any, run: Any, degree: int = 4) -> "TeaCache":
        """The rescaling polynomial: per step, the relative L1 change of the modulated input
        (the signal, x) and of the model output (what it should predict, y);
        ``numpy.polyfit(x, y, degree)`` gives the coefficients (highest degree first)."""
        import numpy as np

        from ..calibration import recorded_run

        never_reuse = TeaCache(threshold=self.threshold, coefficients=(1.0, 0.0), warmup=2**31 - 1)
        records, outputs = recorded_run(model, never_reuse, run)
        xs, ys = [], []
        last: dict[int, tuple[int, Any]] = {}
        for rec, out in zip(records, outputs):
            if rec.slot in last and rec.step == last[rec.slot][0] + 1:
                prev = last[rec.slot][1]
                xs.append(float(rec.scores["site_0"]))
                ys.append(float((out - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)))
            last[rec.slot] = (rec.step, out)
        if len(xs) <= degree:
            raise PolicyError(f"calibration saw {len(xs)} step pairs, fewer than needed for a degree-{degree} fit; run more steps")
        coefficients = np.polyfit(np.asarray(xs), np.asarray(ys), degree)
        return dataclasses.replace(self, coefficients=tuple(float(c) for c in coefficients))
