"""Step tracking and reuse schedules, in plain Python (no torch import).

Shared by the PyTorch runtime and the deployment loaders (ONNX Runtime, TensorRT), so a
deployed engine makes exactly the decisions the eager model makes.
"""

from __future__ import annotations

import math
import warnings

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InputError, RequestBoundaryWarning

SCHEDULE_KINDS = ("never", "interval", "after_warmup")


def allow_reuse(schedule: dict[str, Any], step: int, total_steps: int | None = None, timestep: float | None = None) -> bool:
    """Evaluate a schedule spec at ``step`` of a request of ``total_steps`` steps (when
    known), called with ``timestep`` (when the model has one).

    Kinds:
        ``never``: always compute (NoCache).
        ``interval``: compute at ``warmup, warmup + interval, ...``; reuse otherwise (FORA).
            With ``anchor: "end"`` and a known length, the full steps count back from the
            last step instead (``total_steps - 1``, ``total_steps - 1 - interval``, ... down
            to ``warmup``), so the request always ends on a full computation; of unknown
            length, the schedule counts from the start. With ``timestep_window: [low, high]``
            reuse happens only while ``low < timestep < high`` (Pyramid Attention Broadcast's
            range, on diffusers' 0-1000 timestep scale: see :func:`on_thousand_scale`);
            outside it, or without a timestep, every step computes.
        ``after_warmup``: reuse may happen from step ``warmup`` on; in-graph gates decide.
    """
    kind = schedule.get("kind")
    if kind == "never":
        return False
    if kind == "interval":
        warmup, interval = int(schedule["warmup"]), int(schedule["interval"])
        if step < warmup:
            return False
        window = schedule.get("timestep_window")
        if window is not None and (timestep is None or not float(window[0]) < on_thousand_scale(timestep) < float(window[1])):
            return False
        if schedule.get("anchor", "start") == "end":
            if total_steps is not None:
                return (total_steps - 1 - step) % interval != 0
            _warn_end_anchor_without_length()
        return (step - warmup) % interval != 0
    if kind == "after_warmup":
        return step >= int(schedule["warmup"])
    raise ValueError(f"unknown schedule kind {kind!r}; known kinds: {SCHEDULE_KINDS}")


def on_thousand_scale(timestep: float) -> float:
    """A call's timestep on diffusers' 0-1000 scale. Models called with the timestep divided
    by 1000 (Flux, Lumina's ``1 - t``, most flow-match transformers) pass values in [0, 1],
    which no 0-1000 schedule passes before its last step (integer timesteps 0 or 1, or a
    sigma times 1000 well above 1), so a magnitude of at most 1 is read as that scale."""
    return timestep * 1000.0 if abs(timestep) <= 1.0 else timestep


def _warn_end_anchor_without_length() -> None:
    """Python's filters show it once per place, not once per step."""
    warnings.warn(
        "a schedule anchored to the end (anchor='end') runs in a request that did not announce its length, so its full "
        "steps are counted from the start instead. Compile the pipeline (each call announces num_inference_steps), or "
        "call model.adacache.new_request(total_steps=N) (engine.new_request(total_steps=N) for an exported engine) "
        "before each request",
        RequestBoundaryWarning,
        stacklevel=3,
    )


#: Where an ``interval`` schedule counts its full steps from (see :func:`allow_reuse`).
SCHEDULE_ANCHORS = ("start", "end")


#: A change of timestep larger than this many times the previous change cannot be the next
#: step of the same schedule: across diffusers' schedulers (uniform, Karras, exponential,
#: beta and shifted flow-match sigmas) consecutive changes differ by at most 2.2x.
MAX_GAP_GROWTH = 4.0

#: What one call is, as :meth:`StepTracker.advance` tells it.
NEW_REQUEST = "new_request"  # the first call of a request: every cache starts empty
RESTART = "restart"  # same request, but nothing cached before this call may be reused
NEXT_STEP = "next_step"
NEXT_SLOT = "next_slot"  # the same timestep again: another call of the same step


def _is_step_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


@dataclass
class StepTracker:
    """Recognises requests, steps and call slots from a model's timestep input.

    A request starts explicitly (:meth:`begin_request`: a pipeline call, ``adacache.session``,
    ``new_request()``) or is inferred. Within a request:

    * the same timestep again is the next *slot* of the step (CFG run as two calls, the
      second call of a Heun step); each slot keeps its own cache, so a call only ever reuses
      features of the same kind of call one step earlier;
    * a different timestep is the next step. The schedule's direction (falling for most
      schedulers, rising for Lumina's ``1 - t``) is learned from the first change, and later
      changes must keep it and stay within :data:`MAX_GAP_GROWTH` times the previous change.

    Inferred boundaries, when no explicit one was given:

    * the first call, a change against the learned direction, or a jump beyond
      ``MAX_GAP_GROWTH`` starts a new request;
    * the first change of timestep in an inferred request is ambiguous (the request may
      have had one step, or been cancelled after it, and the call be the next request's):
      the tracker *restarts* there, so the call computes in full and nothing from before it
      is reused. The restart keeps the step count (the call is step 1, :attr:`fresh_from`
      records that the caches start empty there), so a bare denoising loop makes the
      decisions of an explicit request at every step but that one forced computation.

    In an explicit request jumps are trusted (a schedule may be irregular), but a change
    against the direction still starts a new, inferred request; a request that announced its
    length (:attr:`total_steps`) ends after its last step. An inferred request's length is
    not known.

    Without a timestep (``None``), each call is one step; only explicit boundaries and the
    first call start a request.
    """

    step: int = -1
    slot: int = 0
    last_timestep: float | None = None
    generations: int = 0
    restarts: int = 0
    explicit: bool = False
    direction: int = 0
    last_gap: float = 0.0
    #: The step from which this request's caches hold anything: 0, or 1 after a restart.
    fresh_from: int = 0
    #: How many steps the current request runs, when it announced it.
    total_steps: int | None = None
    _explicit_next: bool = False
    _announced: "int | Callable[[], int | None] | None" = None

    def begin_request(self, total_steps: "int | Callable[[], int | None] | None" = None) -> None:
        """The next call starts a new request, whatever its timestep; ``total_steps`` is how
        many steps it runs, when known, or a function that tells it at that first call (a
        pipeline sets its scheduler's timesteps only once it runs)."""
        if not (total_steps is None or callable(total_steps) or _is_step_count(total_steps)):
            raise InputError(f"total_steps must be the number of steps the request runs (an integer >= 1) or None, got {total_steps!r}")
        self.reset()
        self._explicit_next, self._announced = True, total_steps

    def advance(self, timestep: float | None) -> str:
        """Account for one call; return what it is: :data:`NEW_REQUEST`, :data:`RESTART`,
        :data:`NEXT_STEP` or :data:`NEXT_SLOT`."""
        if (self.explicit and self.total_steps is not None and self.step >= self.total_steps - 1
                and timestep != self.last_timestep):
            self.reset()  # the request ran all the steps it announced: this call is another's
        if self.step < 0:
            return self._start(timestep)
        if timestep is None or self.last_timestep is None:
            if (timestep is None) != (self.last_timestep is None):
                return self._start(timestep)  # the timestep input appeared or vanished
            self.step, self.slot = self.step + 1, 0
            return NEXT_STEP
        change = timestep - self.last_timestep
        if change == 0:
            self.slot += 1
            return NEXT_SLOT
        gap = abs(change)
        if self.direction == 0:
            self.direction, self.last_gap = _sign(change), gap
            if self.explicit:
                return self._next(timestep)
            return self._restart(timestep)  # a one-step or cancelled request before this call?
        if _sign(change) != self.direction:
            # Even in an explicit request: a caller who marks one request may not mark the next.
            return self._start(timestep)
        if not self.explicit and gap > MAX_GAP_GROWTH * self.last_gap:
            return self._start(timestep)
        self.last_gap = gap
        return self._next(timestep)

    def _next(self, timestep: float) -> str:
        self.step, self.slot, self.last_timestep = self.step + 1, 0, timestep
        return NEXT_STEP

    def _restart(self, timestep: float) -> str:
        # The schedule keeps its place: only the caches start again, at this step.
        self.step, self.slot, self.last_timestep = self.step + 1, 0, timestep
        self.fresh_from = self.step
        self.restarts += 1
        return RESTART

    def _start(self, timestep: float | None) -> str:
        self.explicit, self._explicit_next = self._explicit_next, False
        announced, self._announced = self._announced, None
        total = (announced() if callable(announced) else announced) if self.explicit else None
        self.total_steps = total if _is_step_count(total) else None  # a scheduler that cannot tell: unknown
        self.step, self.slot, self.last_timestep = 0, 0, timestep
        self.direction, self.last_gap, self.fresh_from = 0, 0.0, 0
        self.generations += 1
        return NEW_REQUEST

    @staticmethod
    def starts_fresh(event: str) -> bool:
        """Whether a call of this kind must start from empty caches."""
        return event in (NEW_REQUEST, RESTART)

    def reset(self) -> None:
        """Forget the position: the next call starts a new request."""
        self.step, self.slot, self.last_timestep = -1, 0, None
        self.direction, self.last_gap, self.fresh_from = 0, 0.0, 0
        self.total_steps, self._explicit_next, self._announced = None, False, None


def call_timestep(low: float, high: float, error: type[Exception]) -> float | None:
    """The one timestep of a call from its rows' lowest and highest value.

    ``None`` when a row is NaN or infinite: such a call computes every site (a non-finite
    input is never served from a cache) and holds no place in the schedule. Rows that differ
    raise ``error`` (:func:`mixed_timesteps_message`)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    if low != high:
        raise error(mixed_timesteps_message(low, high))
    return low


def mixed_timesteps_message(low: float, high: float) -> str:
    """The error text for a batch whose rows carry different timesteps."""
    return (
        f"the batch's rows carry different timesteps ({low:g} ... {high:g}); a cached model keeps one "
        "denoising position per call, so rows at different steps would share one row's cache. "
        "Call the model once per timestep (or batch only requests at the same step)"
    )


def computed_steps(schedule: dict[str, Any], step: int, fresh_from: int = 0, total_steps: int | None = None) -> list[int]:
    """The steps before ``step`` whose full computation the caches hold: ``fresh_from`` (the
    caches start empty there, so it computes whatever the schedule says) and every step after
    it that the schedule computes."""
    if schedule.get("timestep_window") is not None:
        # Past decisions hung on past timesteps, which the step count alone does not tell.
        raise ValueError("a forecast cannot run on a schedule with a timestep window: its full steps depend on the timesteps")
    if step <= fresh_from:
        return []
    return [fresh_from] + [s for s in range(fresh_from + 1, step) if not allow_reuse(schedule, s, total_steps)]


def forecast_controls(
    schedule: dict[str, Any],
    step: int,
    order: int,
    fresh_from: int = 0,
    total_steps: int | None = None,
    basis: "list[list[float]] | None" = None,
) -> tuple[list[float], list[float]]:
    """A forecasting policy's per-step coefficients for a static schedule.

    Returns ``(coef, update)``, each of length ``order + 1``:

    * on a reuse step, the forecast is ``sum_i coef[i] * D_i``, ``k`` the steps since the
      last full computation, for the orders the full steps so far can estimate
      (``i < number of full steps``), 0 beyond. ``coef[i]`` is TaylorSeer's ``k**i / i!``,
      or ``basis[k][i]`` where the policy forecasts in another basis (a table by lag, so that
      a deployed engine reads it as data: HiCache's scaled Hermite polynomials);
    * on a full step, the finite differences are refreshed as
      ``D_i' = (D_{i-1}' - D_{i-1}) * update[i]`` with ``update[i] = 1 / dt`` (``dt`` the
      steps since the previous full computation) where enough full steps exist, 0 beyond.

    The full steps are those the caches hold (:func:`computed_steps`): after a restart at
    ``fresh_from`` the forecast counts from that step's computation, not from steps before it.
    """
    full_before = computed_steps(schedule, step, fresh_from, total_steps)
    coef = [0.0] * (order + 1)
    update = [0.0] * (order + 1)
    coef[0] = update[0] = 1.0
    if allow_reuse(schedule, step, total_steps) and full_before:
        k = step - full_before[-1]
        available = min(order, len(full_before) - 1)
        if basis is not None and k >= len(basis):
            raise ValueError(f"the forecast basis covers lags up to {len(basis) - 1}, but step {step} is {k} steps after "
                             "the last full computation; the policy's table must cover its longest window")
        factorial = 1.0
        for i in range(1, available + 1):
            factorial *= i
            coef[i] = basis[k][i] if basis is not None else k**i / factorial
    elif full_before:
        dt = step - full_before[-1]
        for i in range(1, min(order, len(full_before)) + 1):
            update[i] = 1.0 / dt
    return coef, update
