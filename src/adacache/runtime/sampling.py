"""A denoising loop owned by the runtime, for policies that act on the whole trajectory.

``adacache.sample`` runs the loop a user would write — ``eps = denoise(model, x, t)``, then
``x = scheduler.step(eps, t, x).prev_sample`` — and lets a trajectory-level policy (Z-Cache)
roll the sampler back over a window and re-run it. For other policies it is the plain loop.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PolicyError
from ..policies.zcache import reflection_weight
from .module import CachedModule
from .session import Session

Denoise = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]

# Schedulers whose step is a deterministic function of (model output, timestep, sample) and
# their own state, so re-running a window reproduces it exactly.
REPLAYABLE = {
    "DDIMScheduler", "FlowMatchEulerDiscreteScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler", "PNDMScheduler", "HeunDiscreteScheduler", "DEISMultistepScheduler",
}


def check_replayable(scheduler: Any, step_kwargs: dict[str, Any]) -> None:
    """Raise when the scheduler's step draws noise, so a window cannot be re-run exactly."""
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", {}) or {}
    stochastic = (
        name not in REPLAYABLE
        or bool(config.get("stochastic_sampling", False))
        or float(step_kwargs.get("eta", 0.0) or 0.0) > 0.0
        or float(step_kwargs.get("s_churn", 0.0) or 0.0) > 0.0
    )
    if stochastic:
        raise PolicyError(
            f"Z-Cache re-runs the sampler over each window, and {name} (with these step arguments) draws fresh noise "
            f"in its step, so the replay would not reproduce the trajectory. Use a deterministic scheduler "
            f"({', '.join(sorted(REPLAYABLE))}) with eta = 0 / no churn."
        )


@dataclass
class _Anchor:
    step: int
    latents: torch.Tensor  # the latent entering step ``step + 1``
    scheduler: Any  # the scheduler state after stepping from ``step``
    states: dict[int, list[torch.Tensor]]  # per call slot, the cache after the full computation


class _Replayer:
    """Stands in for the model during a reflected step: every cached site reuses given features."""

    def __init__(self, model: CachedModule, session: Session, states: dict[int, list[torch.Tensor]]) -> None:
        self._model, self._session, self._states, self._calls = model, session, states, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        slot = self._calls
        self._calls += 1
        return self._session.replay(args, kwargs, slot, self._states[slot])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _snapshot(session: Session) -> dict[int, list[torch.Tensor]]:
    return {slot: [t.clone() for t in s.tensors] for slot, s in session.slots.items()}


def _forecast_states(session: Session, old: dict[int, list[torch.Tensor]], new: dict[int, list[torch.Tensor]],
                     k_old: int, k_new: int, w: float) -> dict[int, list[torch.Tensor]]:
    """Per slot, cache tensors whose D_0 is ``(1 - w) F_old(k_old) + w F_new(k_new)`` and whose
    higher differences are zero, so a replayed call reuses exactly those features."""
    out = {}
    for slot, tensors in new.items():
        layout = session.slots[slot].program.layout
        located = {(s.site, s.output, s.difference): i for i, s in enumerate(layout.states) if s.output is not None}
        result = list(tensors)
        for i, spec in enumerate(layout.states):
            if spec.role == "valid":
                result[i] = torch.ones_like(tensors[i])
            elif spec.role == "difference":
                result[i] = torch.zeros_like(tensors[i])  # folded into the value below
            elif spec.role == "accumulated":
                # TeaCache's running sum, set where the gate cannot fail: a replay reuses by definition.
                result[i] = torch.full_like(tensors[i], -1e30)
            elif spec.role == "value":
                terms = [located.get((spec.site, spec.output, j)) for j in range(1, layout.forecast_order + 1)]

                def forecast(states: list[torch.Tensor], k: int, i: int = i, terms: list[int | None] = terms) -> torch.Tensor:
                    value = states[i].clone()
                    for j, pos in enumerate(terms, start=1):
                        if pos is not None:
                            value = value + states[pos] * (k**j / math.factorial(j))
                    return value

                result[i] = (1 - w) * forecast(old[slot], k_old) + w * forecast(tensors, k_new)
            # an offset score's stored input and scale, a gate's measured value: kept as they are
        out[slot] = result
    return out


def sample(
    model: CachedModule,
    scheduler: Any,
    latents: torch.Tensor,
    denoise: Denoise,
    *,
    timesteps: Any = None,
    step_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run a denoising loop with ``model`` (from ``adacache.compile``), owning the trajectory.

    Args:
        model: the compiled model.
        scheduler: a diffusers scheduler with ``set_timesteps`` already called.
        latents: the initial latents.
        denoise: ``denoise(model, latents, t) -> model_output`` for the scheduler, e.g. a CFG
            combination of one batched call; it must call ``model`` (which may be a stand-in
            during reflection) and nothing else stateful.
        timesteps: defaults to ``scheduler.timesteps``.
        step_kwargs: extra arguments for ``scheduler.step``.
        progress: show a tqdm bar over the steps (reflections run inside a step's tick).

    Returns:
        The final latents.
    """
    if not isinstance(model, CachedModule):
        raise TypeError(f"adacache.sample expects a model returned by adacache.compile, got {type(model).__name__}")
    step_kwargs = dict(step_kwargs or {})
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    zcache = model.adacache.policy.owns_trajectory
    if zcache:
        check_replayable(scheduler, step_kwargs)
    model.adacache.new_request(total_steps=len(timesteps))
    session = model.adacache.current_session()
    x = latents
    anchor: _Anchor | None = None
    steps: Any = enumerate(timesteps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, total=len(timesteps), desc="sampling")
    with torch.inference_mode():
        for i, t in steps:
            out = denoise(model, x, t)
            full = zcache and _computed_everything(session, i)
            final = i == len(timesteps) - 1
            if full and anchor is not None and i - anchor.step > 1 and (not final or model.adacache.policy.reflect_final_window):
                x, out, sched = _reflect(model, session, anchor, i, timesteps, denoise, step_kwargs)
                scheduler = _restore(scheduler, sched)
            x = scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]
            if full:
                anchor = _Anchor(i, x.clone(), copy.deepcopy(scheduler), _snapshot(session))
    return x


def _computed_everything(session: Session, step: int) -> bool:
    """Whether every call of ``step`` computed every cached site: a full step, i.e. a window
    boundary. Read from what the step did, so adaptive bases (TeaCache) work like static ones."""
    calls = []
    for rec in reversed(session.stats.records):  # this step's calls are the latest ones
        if rec.step != step:
            break
        calls.append(rec)
    return bool(calls) and not any(bool(flag) for rec in calls for flag in rec.reused.values())


def _restore(target: Any, source: Any) -> Any:
    """Copy the replayed scheduler's state into the user's scheduler object (same identity)."""
    target.__dict__.update(copy.deepcopy(source.__dict__))
    return target


def _reflect(model: CachedModule, session: Session, anchor: _Anchor, t2: int, timesteps: Any, denoise: Denoise,
             step_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Re-run the window (anchor.step, t2] with features blended from both anchors."""
    t1 = anchor.step
    new = _snapshot(session)
    scheduler = copy.deepcopy(anchor.scheduler)
    x = anchor.latents.clone()
    for k in range(t1 + 1, t2):
        w = reflection_weight(k, t1, t2, model.adacache.policy.weight)
        states = _forecast_states(session, anchor.states, new, k - t1, k - t2, w)
        out = denoise(_Replayer(model, session, states), x, timesteps[k])
        x = scheduler.step(out, timesteps[k], x, **step_kwargs, return_dict=False)[0]
    # Step t2 on the re-sampled latent with the new anchor's features, no further full compute.
    states = _forecast_states(session, anchor.states, new, 0, 0, 1.0)
    out = denoise(_Replayer(model, session, states), x, timesteps[t2])
    return x, out, scheduler
