"""Per-thread request state of an exported engine, changed only by calls that succeed.

An engine (ONNX Runtime, TensorRT) serves requests with the same step logic as the PyTorch
runtime: a :class:`~adacache.stepping.StepTracker`, one cache per call slot, and reuse
counters. That state belongs to the request being served, so it is kept per thread (as the
PyTorch runtime keeps one session per thread): two threads calling one engine never read
each other's caches or count each other's steps. And a call is a transaction: it plans its
place in the request on a copy of the tracker and commits it only after the engine ran, so a
call that fails (an error inside the engine) leaves the request as it was and a retry is the
same call again.

torch-free: the loaders that use it need only numpy and their engine.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .. import stepping
from ..stepping import StepTracker

Buffers = TypeVar("Buffers")


@dataclass
class RequestState(Generic[Buffers]):
    """One thread's request on an engine: step tracker, per-slot cache buffers, counters."""

    tracker: StepTracker = field(default_factory=StepTracker)
    slots: dict[int, Buffers] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    calls: int = 0

    def begin_request(self, total_steps: int | None = None) -> None:
        """The next call starts a new request: nothing cached before it is reused;
        ``total_steps`` is how many steps it runs, when known."""
        self.tracker.begin_request(total_steps)
        self.slots.clear()


@dataclass
class PlannedCall(Generic[Buffers]):
    """Where a call falls in its request, before it runs: commit it with :meth:`commit`."""

    state: RequestState[Buffers]
    tracker: StepTracker
    slots: dict[int, Buffers]
    buffers: Buffers

    @property
    def step(self) -> int:
        return self.tracker.step

    def allow_reuse(self, schedule: dict[str, Any]) -> bool:
        """The schedule's verdict for this call: its step, its request's length, its timestep."""
        t = self.tracker
        return stepping.allow_reuse(schedule, t.step, t.total_steps, t.last_timestep)

    def forecast_controls(self, manifest: dict[str, Any]) -> tuple[list[float], list[float]]:
        """The forecast coefficients and update factors of this call, from the manifest's
        ``forecast`` entry (its order, basis and the schedule it follows)."""
        forecast, t = manifest["forecast"], self.tracker
        schedule = manifest["schedules"][forecast["schedule_of"]]
        return stepping.forecast_controls(schedule, t.step, forecast["order"], t.fresh_from, t.total_steps, forecast.get("basis"))

    def commit(self, buffers_after: Buffers, reused_sites: list[str]) -> None:
        """The call ran: its step, its slot's buffers and its reuse counts become the request's."""
        state = self.state
        state.tracker = self.tracker
        self.slots[self.tracker.slot] = buffers_after
        state.slots = self.slots
        for site in reused_sites:
            state.reused[site] = state.reused.get(site, 0) + 1
        state.calls += 1


class PerThreadRequests(Generic[Buffers]):
    """The request state of each thread that calls an engine (made at its first call)."""

    def __init__(self, sites: list[str], new_buffers: Callable[[], Buffers]) -> None:
        self._sites = list(sites)
        self._new_buffers = new_buffers
        self._local = threading.local()

    def current(self) -> RequestState[Buffers]:
        """This thread's request state."""
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = RequestState(reused={site: 0 for site in self._sites})
        return state

    def plan(self, timestep: float | None) -> PlannedCall[Buffers]:
        """Place a call with this timestep in this thread's request, without changing it yet."""
        state = self.current()
        tracker = copy.copy(state.tracker)
        fresh = StepTracker.starts_fresh(tracker.advance(timestep))
        slots = {} if fresh else dict(state.slots)
        buffers = slots.get(tracker.slot)
        if buffers is None:
            buffers = self._new_buffers()
        return PlannedCall(state, tracker, slots, buffers)


def reused_sites(signals: list[dict[str, Any]], values: list[Any]) -> list[str]:
    """The sites whose ``reused`` signal is set, from the manifest's signals and their values."""
    return [signal["site"] for signal, value in zip(signals, values) if signal["kind"] == "reused" and bool(value)]
