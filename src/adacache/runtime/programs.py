"""The programs of one compiled model: one per input signature, each guarded by a
fingerprint of the model it was captured from, least recently used dropped first."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..capture import InputSignature, signature_of
from ..policies.base import Policy
from . import guards
from .program import Program, build_program
from .stats import SessionStats


@dataclass(frozen=True)
class Recapture:
    """A program captured again because the model changed under it."""

    signature: str
    reason: str


class ProgramCache:
    """Captures ``model`` for ``policy`` once per input signature, and never hands out a
    program whose model changed since it was captured (see :mod:`adacache.runtime.guards`)."""

    def __init__(self, model: nn.Module, policy: Policy, *, blocks: Any = None, backend: str = "eager", max_programs: int = 8) -> None:
        self.model = model
        self.policy = policy
        self.blocks = blocks
        self.backend = backend
        self.max_programs = max_programs
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
        program = build_program(self.model, self.policy, args, kwargs, blocks=self.blocks, backend=self.backend)
        program.fingerprint = fingerprint
        program.checked_epoch = guards.registration_epoch()
        program.watch = watch
        self._programs[signature] = program
        while len(self._programs) > self.max_programs:
            self._programs.popitem(last=False)
        return program

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
