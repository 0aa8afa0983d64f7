"""Statistics a session keeps: what was reused, where and when, and why not."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class StepRecord:
    """One call of the model: which sites reused, and the raw signals (resolved lazily)."""

    step: int
    slot: int
    reused: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    valid_after: dict[str, torch.Tensor]


@dataclass
class SessionStats:
    """Counters of one session. Signal tensors are resolved to Python only when read, so a
    GPU run does not synchronise on every step for bookkeeping."""

    generations: int = 0
    calls: int = 0
    captures: int = 0
    invalidations: int = 0
    replays: int = 0  # calls that only ran the non-block part (Z-Cache reflection)
    restarts: int = 0  # ambiguous request boundaries where the caches were cleared
    recaptures: list[str] = field(default_factory=list)  # why a program was captured again
    records: list[StepRecord] = field(default_factory=list)  # current / last generation
    _done: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # site -> [reused, calls]
    _nonfinite: int = 0

    def record(self, rec: StepRecord) -> None:
        self.calls += 1
        self.records.append(rec)

    def close_generation(self) -> None:
        """Fold the finished generation's records into the running totals."""
        for site, (reused, total) in self._count(self.records).items():
            self._done[site][0] += reused
            self._done[site][1] += total
        self._nonfinite += self._count_nonfinite(self.records)
        self.records = []

    @staticmethod
    def _count(records: list[StepRecord]) -> dict[str, tuple[int, int]]:
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for rec in records:
            for site, flag in rec.reused.items():
                out[site][0] += int(bool(flag))
                out[site][1] += 1
        return {k: (v[0], v[1]) for k, v in out.items()}

    @staticmethod
    def _count_nonfinite(records: list[StepRecord]) -> int:
        # A computed site whose fresh cache is not finite leaves valid_after False.
        return sum(1 for rec in records for site, ok in rec.valid_after.items() if not bool(ok))

    def totals(self) -> dict[str, tuple[int, int]]:
        """Per site: (reused calls, all calls), over every generation so far."""
        out = {k: (v[0], v[1]) for k, v in self._done.items()}
        for site, (reused, total) in self._count(self.records).items():
            r0, t0 = out.get(site, (0, 0))
            out[site] = (r0 + reused, t0 + total)
        return out

    @property
    def nonfinite(self) -> int:
        """Times a computed site produced a non-finite cache, which was then not reused."""
        return self._nonfinite + self._count_nonfinite(self.records)
