"""Step tracking and reuse schedules, in plain Python (no torch import).

Shared by the PyTorch runtime and the deployment loaders (ONNX Runtime, TensorRT), so a
deployed engine makes exactly the decisions the eager model makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCHEDULE_KINDS = ("never", "interval", "after_warmup")


def allow_reuse(schedule: dict[str, Any], step: int) -> bool:
    """Evaluate a schedule spec at ``step``.

    Kinds:
        ``never``: always compute (NoCache).
        ``interval``: compute at ``warmup, warmup + interval, ...``; reuse otherwise (FORA).
        ``after_warmup``: reuse may happen from step ``warmup`` on; in-graph gates decide.
    """
    kind = schedule.get("kind")
    if kind == "never":
        return False
    if kind == "interval":
        warmup, interval = int(schedule["warmup"]), int(schedule["interval"])
        return step >= warmup and (step - warmup) % interval != 0
    if kind == "after_warmup":
        return step >= int(schedule["warmup"])
    raise ValueError(f"unknown schedule kind {kind!r}; known kinds: {SCHEDULE_KINDS}")


@dataclass
class StepTracker:
    """Recognises steps, call slots and generations from a model's timestep input.

    * the same timestep again is the next *slot* of the step (CFG run as two calls);
    * a smaller timestep is the next step;
    * a larger timestep, or the first call, starts a new generation;
    * without a timestep (``None``), each call is one step.
    """

    step: int = -1
    slot: int = 0
    last_timestep: float | None = None
    generations: int = 0

    def advance(self, timestep: float | None) -> bool:
        """Account for one call; return True when it starts a new generation."""
        new_generation = False
        if timestep is None:
            new_generation = self.step < 0
            self.step += 1
            self.slot = 0
        elif self.last_timestep is None or timestep > self.last_timestep:
            new_generation = True
            self.step, self.slot = 0, 0
        elif timestep == self.last_timestep:
            self.slot += 1
        else:
            self.step += 1
            self.slot = 0
        if new_generation:
            self.generations += 1
        self.last_timestep = timestep
        return new_generation

    def reset(self) -> None:
        """Forget the position: the next call starts a new generation."""
        self.step, self.slot, self.last_timestep = -1, 0, None


def forecast_controls(schedule: dict[str, Any], step: int, order: int) -> tuple[list[float], list[float]]:
    """TaylorSeer's per-step coefficients for a static schedule.

    Returns ``(coef, update)``, each of length ``order + 1``:

    * on a reuse step, the forecast is ``sum_i coef[i] * D_i`` with ``coef[i] = k**i / i!``,
      ``k`` the steps since the last full computation, for the orders the full steps so far
      can estimate (``i < number of full steps``), 0 beyond;
    * on a full step, the finite differences are refreshed as
      ``D_i' = (D_{i-1}' - D_{i-1}) * update[i]`` with ``update[i] = 1 / dt`` (``dt`` the
      steps since the previous full computation) where enough full steps exist, 0 beyond.
    """
    full_before = [s for s in range(step) if not allow_reuse(schedule, s)]
    coef = [0.0] * (order + 1)
    update = [0.0] * (order + 1)
    coef[0] = update[0] = 1.0
    if allow_reuse(schedule, step) and full_before:
        k = step - full_before[-1]
        available = min(order, len(full_before) - 1)
        factorial = 1.0
        for i in range(1, available + 1):
            factorial *= i
            coef[i] = k**i / factorial
    elif full_before:
        dt = step - full_before[-1]
        for i in range(1, min(order, len(full_before)) + 1):
            update[i] = 1.0 / dt
    return coef, update
