"""MagCache: skip the blocks while the accumulated error of their residual's magnitude ratio
stays small; the ratio curve is calibrated once per model."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import PolicyError
from ..passes.regions import Region
from ..recording import OutputRecorder
from ..validate import policy_number, policy_numbers
from .base import Policy, SitePlan, StepContext, policy_dataclass


@policy_dataclass
class MagCache(Policy):
    """MagCache (Ma et al. 2025; survey Eqs. 29-30), decisions as in diffusers' ``MagCacheConfig``.

    The residual the blocks add, ``r_t``, changes its magnitude from step to step by a ratio
    ``gamma_t = ||r_t|| / ||r_{t-1}||`` (Eq. 29) that follows one curve for a model, whatever
    the prompt, while its direction barely moves. The curve (``mag_ratios``, one value per
    step) is measured once per model with :func:`adacache.calibrate`. From step
    ``int(retention_ratio * N + 0.5)`` on (``N`` the request's step count), each step
    multiplies an accumulated ratio ``R`` by ``gamma_t`` and adds ``|1 - R|`` (Eq. 30) to an
    accumulated error ``E``; while ``E <= threshold`` and at most ``max_skip_steps`` steps
    were skipped in a row, every block is skipped and the last residual is added to the
    current input. Otherwise the blocks run and ``R``, ``E`` and the count start again.

    The decisions depend only on the step, the request's length and the curve, so they are a
    host-side schedule (one reuse flag per step, no score in the graph). Because they need the
    request's length, which deployed engines are not told, MagCache runs on the PyTorch
    backends (eager, ``torch.compile``) and export refuses it.

    Args:
        threshold: the budget of accumulated error ``E`` (diffusers' default 0.06).
        max_skip_steps: the most steps skipped in a row (``K``).
        retention_ratio: the leading fraction of the steps that always compute.
        mag_ratios: ``gamma_t`` per step, from :func:`adacache.calibrate`; a curve measured
            with another step count is resampled to the request's (nearest neighbour, as
            diffusers does).
    """

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    mag_ratios: tuple[float, ...] | None = None

    backends = ("eager", "inductor")  # the schedule needs the request's length (see above)

    def __post_init__(self) -> None:
        name = "MagCache"
        object.__setattr__(self, "threshold", policy_number(name, "threshold", self.threshold, minimum=0))
        object.__setattr__(self, "max_skip_steps", policy_number(name, "max_skip_steps", self.max_skip_steps, integer=True, minimum=1))
        object.__setattr__(self, "retention_ratio", policy_number(name, "retention_ratio", self.retention_ratio, minimum=0, maximum=1))
        if self.mag_ratios is not None:
            ratios = policy_numbers(name, "mag_ratios", self.mag_ratios)
            for i, ratio in enumerate(ratios):
                policy_number(name, f"mag_ratios[{i}]", ratio, minimum=0, exclusive_minimum=True)
            object.__setattr__(self, "mag_ratios", ratios)

    def check_model(self, model: Any) -> None:
        if self.mag_ratios is None:
            raise PolicyError(
                f"MagCache needs the magnitude ratios of this {type(model).__name__}'s residual (mag_ratios), measured in one "
                "full-computation run: policy = adacache.calibrate(model, adacache.MagCache(), run), where run(denoiser) "
                "performs one generation; or pass mag_ratios=(...) from an earlier calibration"
            )

    def plan(self, blocks: list[Region]) -> list[SitePlan]:
        return self._span_site(blocks, "residual")

    def schedule(self, site: SitePlan) -> dict[str, Any]:
        raise NotImplementedError("MagCache's decisions depend on the request's step count; see allow_reuse")

    def allow_reuse(self, ctx: StepContext, site: SitePlan) -> bool:
        if self.mag_ratios is None:
            raise PolicyError("MagCache has no mag_ratios: calibrate it first (adacache.calibrate(model, MagCache(), run))")
        steps = ctx.total_steps
        if steps is None:
            steps = len(self.mag_ratios)
            _warn_unknown_length(steps)
        if ctx.step >= steps:
            return False
        return reuse_steps(self.mag_ratios, steps, self.threshold, self.max_skip_steps, self.retention_ratio)[ctx.step]

    def calibrate(self, model: Any, run: Callable[[nn.Module], Any], degree: int = 4) -> "MagCache":
        """The magnitude ratio of the blocks' residual between consecutive steps, measured in
        one full-computation run: per call, the per-token norms of the residual the blocks
        added, divided by the previous step's (same call slot), averaged; 1.0 at the first step.
        ``degree`` is not used (the curve is measured, not fitted)."""
        from ..api import compile as compile_model
        from ..api import session
        from .fora import FORA

        # FORA(interval=1) keeps the blocks' residual as its cache and never reuses it.
        keeper = compile_model(model, FORA(interval=1, reuse="residual"))
        residuals = _ResidualRecorder(keeper)
        with session(keeper), torch.inference_mode():
            run(residuals)
        if len(residuals.per_step) < 2:
            raise PolicyError(f"MagCache calibration saw {len(residuals.per_step)} denoising step(s); run(denoiser) must run a whole generation")
        ratios = [1.0]
        for previous, current in zip(residuals.per_step, residuals.per_step[1:]):
            pairs = [(current[slot], previous[slot]) for slot in current if slot in previous]
            if not pairs:
                raise PolicyError("MagCache calibration: consecutive steps share no call slot (CFG call order changed mid-run)")
            ratios.append(sum(_norm_ratio(now, before) for now, before in pairs) / len(pairs))
        return dataclasses.replace(self, mag_ratios=tuple(ratios))


@functools.lru_cache(maxsize=64)
def reuse_steps(ratios: tuple[float, ...], steps: int, threshold: float, max_skip_steps: int, retention_ratio: float) -> tuple[bool, ...]:
    """Which of ``steps`` steps skip the blocks (Eq. 30 with diffusers' bookkeeping, in float32
    as diffusers keeps its accumulators, so that decisions at the threshold agree)."""
    gamma = resample(ratios, steps)
    retention_step = int(retention_ratio * steps + 0.5)
    one = torch.tensor(1.0)
    ratio, error, skipped = one, torch.tensor(0.0), 0
    decisions = []
    for step in range(steps):
        skip = False
        if step >= retention_step:
            ratio = ratio * gamma[step]
            skipped += 1
            error = error + (one - ratio).abs()
            # Step 0 always computes: there is no residual to reuse yet.
            skip = step > 0 and bool(error <= threshold) and skipped <= max_skip_steps
            if not skip:
                ratio, error, skipped = one, torch.tensor(0.0), 0
        decisions.append(skip)
    return tuple(decisions)


def resample(ratios: Sequence[float], steps: int) -> torch.Tensor:
    """The ratio curve at ``steps`` points: nearest neighbour on a uniform grid (float32)."""
    curve = torch.tensor(ratios, dtype=torch.float32)
    if steps == len(curve):
        return curve
    if steps == 1:
        return curve[-1:]
    scale = (len(curve) - 1) / (steps - 1)
    return curve[torch.round(torch.arange(steps, dtype=torch.float32) * scale).long()]


def _norm_ratio(current: list[torch.Tensor], previous: list[torch.Tensor]) -> float:
    """Mean over tokens (of every stream) of ``||r_t|| / ||r_{t-1}||``, norms over channels."""
    now = torch.cat([torch.linalg.vector_norm(r.float(), dim=-1).reshape(-1) for r in current])
    before = torch.cat([torch.linalg.vector_norm(r.float(), dim=-1).reshape(-1) for r in previous])
    return float((now / (before + 1e-8)).mean())


class _ResidualRecorder(OutputRecorder):
    """Calls the compiled model and keeps, per step and call slot, the residual its blocks
    added (the cache a residual-reusing span keeps), rather than the model's output."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__(compiled)
        self.per_step: list[dict[int, list[torch.Tensor]]] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        sess = self.inner.adacache.latest_session()
        slot = sess.slots[sess.slot]
        values = [t.clone() for spec, t in zip(slot.program.layout.states, slot.tensors) if spec.role == "value"]
        while len(self.per_step) <= sess.step:
            self.per_step.append({})
        self.per_step[sess.step][sess.slot] = values
        return out


def _warn_unknown_length(assumed: int) -> None:
    """Resampling the curve needs the request's step count (Python's filters show it once)."""
    warnings.warn(
        f"MagCache does not know how many steps this request runs, so it assumes {assumed}, the length of its "
        "calibrated ratio curve; with another step count its decisions are not MagCache's. Compile the pipeline "
        "(each call announces num_inference_steps), or call model.adacache.new_request(total_steps=N) before each request",
        UserWarning,
        stacklevel=2,
    )
