"""The programs of one compiled model: one per input signature, each guarded by a
fingerprint of the model it was captured from, least recently used dropped first."""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..capture import InputSignature, signature_of
from ..errors import CaptureError, CaptureFallbackWarning, NotEligibleError, caller_stacklevel
from ..policies.base import Policy
from . import guards
from .program import Program, build_program
from .stats import SessionStats


#: ``capture=`` modes: the whole model as one graph, each run of its blocks, or the first
#: that works (see :mod:`adacache.blockwise`).
CAPTURE_MODES = ("auto", "graph", "blocks")


def _one_line(error: CaptureError) -> str:
    """The exporter's reason and the model's line, for a one-line warning."""
    where = f" at {error.source.file}:{error.source.line}: {error.source.code}" if error.source is not None else ""
    return f"{error.reason or str(error).splitlines()[0]}{where}"


@dataclass(frozen=True)
class Recapture:
    """A program captured again because the model changed under it."""

    signature: str
    reason: str


class ProgramCache:
    """Captures ``model`` for ``policy`` once per input signature, and never hands out a
    program whose model changed since it was captured (see :mod:`adacache.runtime.guards`)."""

    def __init__(
        self, model: nn.Module, policy: Policy, *, blocks: Any = None, backend: str = "eager", max_programs: int = 8,
        capture: str = "auto",
    ) -> None:
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
        self.model = model
        self.policy = policy
        self.blocks = blocks
        self.backend = backend
        self.max_programs = max_programs
        self.capture = capture
        #: Why whole-model capture failed, once ``"auto"`` fell back to blocks (later
        #: signatures go straight to blocks: the same code fails the same way).
        self.fallback_reason: str | None = None
        #: Every time the programs were dropped because the model changed, oldest first.
        self.recaptures: list[Recapture] = []
        self._programs: OrderedDict[InputSignature, Program] = OrderedDict()
        self._lock = threading.RLock()

    @property
    def programs(self) -> list[Program]:
        """The programs captured so far, oldest first."""
        return list(self._programs.values())

    def get(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], stats: SessionStats, *, check_model: bool = True
    ) -> tuple[Program, InputSignature]:
        """The program for these inputs, captured now if needed.

        ``check_model`` compares the whole model fingerprint (done at every request start);
        otherwise only the process-wide registration counter and the program's
        :class:`~adacache.runtime.guards.CallWatch` are compared, and the full comparison
        runs only when one of them moved.
        """
        signature = signature_of(args, kwargs)
        program = self._programs.get(signature)
        if program is not None:
            self._programs.move_to_end(signature)  # least recently used goes first when full
        if program is not None and (
            check_model or program.checked_epoch != guards.registration_epoch() or program.watch.changed()
        ):
            program = self._checked(program, stats)
        if program is None:
            with self._lock:
                program = self._programs.get(signature)
                if program is None:
                    program = self._capture(signature, args, kwargs)
                    stats.captures += 1
        return program, signature

    def _capture(self, signature: InputSignature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Program:
        fingerprint, watch = guards.ModelFingerprint.of(self.model), guards.CallWatch.of(self.model)
        program = self._build(args, kwargs)
        program.fingerprint = fingerprint
        program.checked_epoch = guards.registration_epoch()
        program.watch = watch
        self._programs[signature] = program
        while len(self._programs) > self.max_programs:
            self._programs.popitem(last=False)
        return program

    def _build(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Program:
        """The program in the capture mode asked for; ``"auto"`` falls back from the whole
        graph to blocks with one warning that names the exporter's reason and the line."""
        options = {"blocks": self.blocks, "backend": self.backend}
        if self.capture == "graph" or (self.capture == "auto" and self.fallback_reason is None):
            try:
                return build_program(self.model, self.policy, args, kwargs, capture="graph", **options)
            except CaptureError as whole:
                if self.capture == "graph":
                    raise
                try:
                    program = build_program(self.model, self.policy, args, kwargs, capture="blocks", **options)
                except (CaptureError, NotEligibleError) as blockwise:
                    raise CaptureError(
                        f"{whole}\ncapture='blocks' (tried because capture='auto') failed too: {str(blockwise).splitlines()[0]}"
                    ) from whole
                self.fallback_reason = _one_line(whole)
                warnings.warn(
                    f"torch.export could not capture {type(self.model).__name__} whole ({self.fallback_reason}); it runs with "
                    f"capture='blocks': its own code eagerly, each run of its blocks as a captured graph. Pass capture='graph' "
                    "to make this an error, capture='blocks' to skip the attempt",
                    CaptureFallbackWarning,
                    stacklevel=caller_stacklevel(),
                )
                return program
        return build_program(self.model, self.policy, args, kwargs, capture="blocks", **options)

    def _checked(self, program: Program, stats: SessionStats) -> Program | None:
        """``program`` if the model still matches its fingerprint; otherwise forget every
        program (all were captured from the old model) and return None."""
        epoch = guards.registration_epoch()
        reason = program.fingerprint.difference(guards.ModelFingerprint.of(self.model)) if program.fingerprint else None
        if reason is None:
            program.checked_epoch = epoch
            if program.watch.changed():  # a watched value moved in a way the fingerprint does not count: rewatch
                program.watch = guards.CallWatch.of(self.model)
            return program
        with self._lock:
            if self._programs:
                self.recaptures.append(Recapture(program.captured.signature.describe(), reason))
                stats.recaptures.append(reason)
                self._programs.clear()
        return None
