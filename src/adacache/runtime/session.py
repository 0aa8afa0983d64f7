"""A session: the per-request cache state, step counter and statistics.

One session serves one request at a time. A request starts explicitly (each call of a
compiled pipeline, ``with adacache.session(model):``, ``model.adacache.new_request()`` or
``reset()``) or is inferred from the timestep input; the rules are
:class:`adacache.stepping.StepTracker`'s, in short:

* the same timestep again is the next *slot* of the same step (classifier-free guidance as
  two calls, a Heun step's second call); each slot keeps its own cache;
* a timestep that reverses the schedule's direction or jumps far beyond its spacing starts
  a new request; the first change of timestep of an inferred request is ambiguous and
  clears the caches (a bare loop computes its first two steps in full, and keeps the step
  count, so every later step decides as in an explicit request);
* a change of input signature that a slot has not seen replaces that slot's cache.

At every request start the model is compared with the fingerprint its program was captured
from, and captured again if it changed (see :mod:`adacache.runtime.guards`).

Sessions are not shared between threads: the runtime gives each thread its own unless one
is entered explicitly with ``adacache.session``.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..capture import InputSignature
from ..errors import SessionError
from ..policies.base import StepContext
from ..stepping import NEW_REQUEST, StepTracker
from .programs import ProgramCache
from .stats import SessionStats, StepRecord
from .step_inputs import StepInputs

if TYPE_CHECKING:
    from .program import Program


@dataclass
class SlotState:
    """The cache of one call slot (for example the unconditional call of a CFG pair)."""

    signature: InputSignature
    program: "Program"
    tensors: list[torch.Tensor]


@dataclass
class Session:
    """Per-request state of a compiled model. Create with ``adacache.session(model)``.

    A session is handed what it runs with: the model's ``programs`` (captured per input
    signature) and its ``inputs`` (the timestep reader and the policy's step controls);
    ``on_inferred_request`` is called when a call starts a request nobody announced.
    """

    programs: ProgramCache
    inputs: StepInputs
    on_inferred_request: Callable[[], None] = lambda: None
    stats: SessionStats = field(default_factory=SessionStats)
    tracker: StepTracker = field(default_factory=StepTracker)
    slots: dict[int, SlotState] = field(default_factory=dict)
    _thread: int = field(default_factory=threading.get_ident)

    @property
    def step(self) -> int:
        """Index of the current denoising step in the generation (-1 before the first call)."""
        return self.tracker.step

    @property
    def slot(self) -> int:
        """Index of the current call within the step (CFG as two calls: 0 and 1)."""
        return self.tracker.slot

    @property
    def total_steps(self) -> int | None:
        """Steps the current request runs, when it announced them (a pipeline's num_inference_steps)."""
        return self.tracker.total_steps

    def reset(self) -> None:
        """Forget every cache; the next call starts a new request."""
        self.begin_request(None)

    def begin_request(self, total_steps: "int | Callable[[], int | None] | None" = None) -> None:
        """The next call starts a new request, whatever its timestep; ``total_steps`` is
        how many steps it will run, when known (or a function that tells it at the first call,
        once the pipeline has set its scheduler's timesteps)."""
        if self.tracker.step >= 0:
            self.stats.close_generation()
        self.slots.clear()
        self.tracker.begin_request(total_steps)

    def _advance(self, timestep: float | None) -> bool:
        """Place this call in the request; True when it must start from empty caches."""
        event = self.tracker.advance(timestep)
        if event == NEW_REQUEST:
            if not self.tracker.explicit:
                self.on_inferred_request()
            if self.stats.records:
                self.stats.close_generation()
        self.stats.generations = self.tracker.generations
        self.stats.restarts = self.tracker.restarts
        fresh = StepTracker.starts_fresh(event)
        if fresh:
            self.slots.clear()
        return fresh

    # -- one call -----------------------------------------------------------------------
    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run one model call: pick the program, feed the caches in, keep the new ones."""
        if self._thread != threading.get_ident():
            raise SessionError(
                "this adacache session belongs to another thread; concurrent requests need one "
                "session each (enter `with adacache.session(model):` in each thread)"
            )
        # A call that fails leaves no trace: a retry is the same call, in the same slot, with
        # the caches it would have had (the CFG pair's other call never takes its place).
        position, slots = copy.copy(self.tracker), dict(self.slots)
        try:
            return self._call(args, kwargs)
        except BaseException:
            self.tracker, self.slots = position, slots
            raise

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        starts_fresh = self._advance(self.inputs.timestep(args, kwargs))
        program, signature = self.programs.get(args, kwargs, self.stats, check_model=starts_fresh)
        flat = program.captured.flatten_inputs(args, kwargs)
        if torch.is_grad_enabled() and program.layout.states:
            _refuse_gradients(self.programs, flat)
        device = _device_of(flat)

        slot = self.slots.get(self.slot)
        if slot is None or slot.signature != signature or slot.program is not program:
            if slot is not None:
                # Shapes changed mid-generation: a stale cache must never be reused.
                self.stats.invalidations += 1
            slot = SlotState(signature, program, program.initial_state(device))
            self.slots[self.slot] = slot

        tracker = self.tracker
        ctx = StepContext(step=tracker.step, slot=tracker.slot, timestep=tracker.last_timestep, total_steps=tracker.total_steps,
                          fresh_from=tracker.fresh_from)
        controls = self.inputs.controls(program, ctx, device)
        outputs = program.graph_module(*flat, *controls, *slot.tensors)
        layout = program.layout
        n_user, n_state = layout.num_user_outputs, len(layout.states)
        slot.tensors = list(outputs[n_user : n_user + n_state])
        self._record(program, outputs[n_user + n_state :], slot.tensors)
        return program.captured.unflatten_outputs(outputs[:n_user])

    def replay(self, args: tuple[Any, ...], kwargs: dict[str, Any], slot: int, states: list[torch.Tensor]) -> Any:
        """Run one call with every cached site *reusing* the given cache tensors.

        Used by trajectory-level policies (Z-Cache's reflection): only the non-block part of
        the network runs. The session's caches, step counter and statistics are untouched;
        ``states`` follow ``program.layout.states`` for the program of these inputs.
        """
        program, _ = self.programs.get(args, kwargs, self.stats, check_model=False)
        flat = program.captured.flatten_inputs(args, kwargs)
        controls = self.inputs.replay_controls(program, _device_of(flat))
        outputs = program.graph_module(*flat, *controls, *states)
        self.stats.replays += 1
        return program.captured.unflatten_outputs(outputs[: program.layout.num_user_outputs])

    def _record(self, program: "Program", signals: Any, states: list[torch.Tensor]) -> None:
        reused, scores = {}, {}
        for spec, value in zip(program.layout.signals, signals):
            (reused if spec.kind == "reused" else scores)[spec.site] = value
        # A site's validity flag after the call is False only when it computed a non-finite
        # cache (a reuse keeps it True), so it is kept as a tensor and counted when read.
        valid_after = {spec.site: tensor for spec, tensor in zip(program.layout.states, states) if spec.kind == "valid"}
        self.stats.record(StepRecord(self.step, self.slot, reused, scores, valid_after))

    def cache_bytes(self) -> int:
        """Bytes held by this session's caches right now."""
        return sum(t.numel() * t.element_size() for s in self.slots.values() for t in s.tensors)


def _refuse_gradients(programs: ProgramCache, flat: list[Any]) -> None:
    """A caching policy under autograd: reused features carry no gradient to the blocks they
    skip, and the caches would keep every step's autograd graph alive. Refused, saying why."""
    inputs = any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat)
    if inputs or any(p.requires_grad for p in programs.model.parameters()):
        raise SessionError(
            f"{type(programs.model).__name__} is compiled with {programs.policy.describe()}, which reuses cached features, and was "
            "called with gradients enabled: reused steps carry no gradient to the blocks they skip, and the caches would "
            "keep each step's autograd graph alive. Run inference under torch.no_grad() or torch.inference_mode() "
            "(diffusers pipelines do), or train the plain model (adacache.uncompile(model))"
        )


def _device_of(flat: list[Any]) -> torch.device:
    for leaf in flat:
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")
