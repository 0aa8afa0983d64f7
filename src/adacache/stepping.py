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
