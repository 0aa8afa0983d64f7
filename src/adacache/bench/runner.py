"""Run a matrix of policies on a model: images for fidelity, interleaved timings for speed."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import adacache
from adacache.policies.base import Policy


@dataclass
class Variant:
    """One row of the benchmark: a denoiser to time and score, and how it was made."""

    name: str
    family: str
    denoiser: Any
    policy: Policy | None = None
    new_generation: Callable[[], None] | None = None
    stats: Callable[[], dict[str, Any]] | None = None
    error: str | None = None


@dataclass
class Row:
    """Every figure measured for one variant at one guidance scale."""

    name: str
    family: str
    guidance: float
    seconds: float | None = None
    speedup: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    perceptual: float | None = None
    accuracy: float | None = None
    fd_digits: float | None = None
    hit_rate: float | None = None
    flops_skipped: float | None = None
    flop_bound: float | None = None
    achieved_over_bound: float | None = None
    cache_mib: float | None = None
    peak_mib: float | None = None  # CUDA only: CPU allocations have no per-run peak counter
    speedup_low: float | None = None  # interquartile range of the paired ratios
    speedup_high: float | None = None
    speed_unreliable: str | None = None  # why the timing run's numbers did not settle
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("adacache", "torch", "diffusers", "cache-dit", "onnxruntime", "torchmetrics")},
    }


@dataclass(frozen=True)
class Settling:
    """When a timing run's numbers are trusted, and how much more timing may settle them.

    The *control* is the baseline timed against itself (:func:`control_variant`): its median
    paired ratio must read 1 within ``control_tolerance``, or the machine was busy while it
    was timed. A variant's spread is the interquartile range of its paired ratios over their
    median: wider than ``max_spread``, or measured on fewer than ``min_pairs`` pairs, and the
    median is not yet a number to print. Until both hold, more rounds are timed (the
    unsettled variants; every variant when the control is off), for at most ``time_budget``
    more seconds and ``max_rounds`` rounds in all.
    """

    control_tolerance: float = 0.05
    max_spread: float = 0.15
    time_budget: float = 0.0
    max_rounds: int = 30
    #: A median of fewer pairs is decided by one disturbed run (issue 30's table had two).
    min_pairs: int = 3


@dataclass
class Timings:
    """Wall times of an interleaved run.

    ``speedup`` is the median over repeats of the *paired* ratio: each run of a variant
    divided into the baseline run timed just before it. A shared machine drifts over a long
    bench (minutes of slow phases); a pair sees the same phase, so the ratio survives it,
    where a ratio of medians taken at different times would not. ``spread`` is the
    interquartile range of each variant's paired ratios, ``pairs`` how many were timed, and
    ``unreliable`` the reason no number of the run is to be trusted (the control was off),
    ``noisy`` the reason for each variant whose ratios alone did not settle.
    """

    seconds: dict[str, float]
    baseline: float
    speedup: dict[str, float]
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)
    pairs: dict[str, int] = field(default_factory=dict)
    control: str | None = None
    unreliable: str | None = None
    noisy: dict[str, str] = field(default_factory=dict)


def interquartile(values: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles (both the value itself for one value)."""
    if len(values) < 2:
        return (values[0], values[0])
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q1, q3)


def _unsettled(ratios: dict[str, list[float]], control: str | None, settle: Settling) -> tuple[str | None, dict[str, str]]:
    """Why the numbers are not yet trusted: the control's reading when it is off (a bias no
    variant's ratio escapes), and each variant whose paired ratios spread too wide."""
    control_off = None
    if control is not None and ratios.get(control):
        reading = statistics.median(ratios[control])
        q1, q3 = interquartile(ratios[control])
        if abs(reading - 1.0) > settle.control_tolerance:
            control_off = (f"control {control} read {reading:.2f}x [{q1:.2f}–{q3:.2f}], not 1.00 ± "
                           f"{settle.control_tolerance:.2f}: the machine was busy")
    wide = {}
    for name, values in ratios.items():
        if values and len(values) < settle.min_pairs:
            wide[name] = (f"only {len(values)} paired run(s), fewer than {settle.min_pairs}: one disturbed run can "
                          "decide the median")
        elif values:
            q1, q3 = interquartile(values)
            width = (q3 - q1) / statistics.median(values)
            if width > settle.max_spread:
                wide[name] = (f"paired ratios spread over {width:.0%} of their median (interquartile), more than "
                              f"{settle.max_spread:.0%}: the machine was noisy")
    return control_off, wide


def time_interleaved(
    run: Callable[[Any], Any],
    variants: Sequence[Variant],
    baseline: Variant,
    repeats: int,
    progress: Any = None,
    *,
    control: str | None = None,
    settle: Settling | None = None,
    clock: Callable[[], float] | None = None,
) -> Timings:
    """Wall time of ``run(denoiser)`` per variant, with the baseline timed just before every
    variant run, in an order that rotates each round (see :class:`Timings`); then more rounds
    until the numbers settle or the budget is spent (see :class:`Settling`)."""
    settle = settle or Settling()
    now = clock or time.perf_counter  # looked up per call: tests replace the module's clock
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    ratios: dict[str, list[float]] = {v.name: [] for v in variants}
    base: list[float] = []
    live = [v for v in variants if not v.error]

    def time_round(round_: int, members: Sequence[Variant]) -> None:
        shift = round_ % max(1, len(members))
        for variant in list(members[shift:]) + list(members[:shift]):
            pair = []
            for target, sink in ((baseline, base), (variant, times[variant.name])):
                if target.new_generation:
                    target.new_generation()
                start = now()
                run(target.denoiser)
                pair.append(now() - start)
                sink.append(pair[-1])
            ratios[variant.name].append(pair[0] / pair[1])
            if progress is not None:
                progress.update(1)

    if live:
        # One untimed baseline run: the first run after other work (scoring, captures) is
        # slower, and as the first pair's baseline it would inflate a ratio.
        if baseline.new_generation:
            baseline.new_generation()
        run(baseline.denoiser)
    for rep in range(repeats):
        time_round(rep, live)
    started, round_ = now(), repeats
    control_off, wide = _unsettled(ratios, control, settle)
    while (control_off or wide) and round_ < settle.max_rounds:
        members = live if control_off else [v for v in live if v.name in wide]
        per_pair = (sum(base) + sum(sum(t) for t in times.values())) / max(1, len(base))
        if now() - started + per_pair * len(members) > settle.time_budget:
            break  # another round would overrun the budget
        time_round(round_, members)
        round_ += 1
        control_off, wide = _unsettled(ratios, control, settle)
    return Timings(
        seconds={k: statistics.median(v) for k, v in times.items() if v},
        baseline=statistics.median(base) if base else float("nan"),
        speedup={k: statistics.median(v) for k, v in ratios.items() if v},
        spread={k: interquartile(v) for k, v in ratios.items() if v},
        pairs={k: len(v) for k, v in ratios.items() if v},
        control=control,
        unreliable=control_off,
        noisy=wide,
    )


CONTROL = "full computation (control)"
CONTROL_FAMILY = "control"


def control_variant(baseline: Variant) -> Variant:
    """The instrument's control: the baseline timed against itself (an A/A pair), which reads
    1.00x whenever the machine gives both runs of a pair the same conditions.

    ``NoCache`` is not the control: it runs the captured graph, not the module, and on a small
    model that alone is measurably faster (1.06-1.11x on the reference model in every quiet
    ``bench --quick`` run here, see the README); its ratio is a measurement, the control's is
    the machine's noise.
    """
    return Variant(CONTROL, CONTROL_FAMILY, baseline.denoiser, new_generation=baseline.new_generation)


def control_row(timings: Timings, guidance: float = 0.0, note: str | None = None) -> Row:
    """The control's row: its reading and spread, and whether the run settled."""
    row = Row(CONTROL, CONTROL_FAMILY, guidance, seconds=timings.seconds.get(CONTROL), note=note)
    if CONTROL in timings.speedup:
        apply_timings(row, timings, CONTROL)
    return row


def apply_timings(row: Row, timings: Timings, name: str) -> None:
    """Copy a variant's speed figures (and the run's reliability) into its row."""
    row.speedup = timings.speedup[name]
    row.speedup_low, row.speedup_high = timings.spread[name]
    row.extra["pairs"] = timings.pairs[name]
    row.speed_unreliable = timings.unreliable or timings.noisy.get(name)


def policy_variant(model: torch.nn.Module, policy: Policy, name: str | None = None, backend: str = "eager") -> Variant:
    """A variant for an adacache policy; statistics come from the session of the last run."""
    cached = adacache.compile(model, policy, backend=backend)
    return Variant(
        name=name or policy.describe(),
        family=_family(policy),
        denoiser=cached,
        policy=policy,
        new_generation=cached.adacache.reset,
        stats=lambda: _policy_stats(cached),
    )


def _family(policy: Policy) -> str:
    """Curve name in tables and plots: the method, and its base for composed policies."""
    base = getattr(policy, "base", None)
    name = type(policy).__name__ + (f"+{type(base).__name__}" if isinstance(base, Policy) else "")
    if isinstance(base, Policy) and not base.proposes_reuse:
        name = f"{type(policy).__name__} alone"  # a base that caches every step and proposes no reuse
    granularity = getattr(policy, "granularity", "block")
    calibrated = getattr(policy, "calibrated", False) or getattr(base, "calibrated", False)
    span = getattr(policy, "unit", "block") == "span"  # one decision per step: a curve of its own
    return (f"adacache {name}" + (" (module)" if granularity == "module" else "") + (" (span)" if span else "")
            + (" (calibrated)" if calibrated else ""))


def _policy_stats(cached: Any) -> dict[str, Any]:
    summary = adacache.summary(cached)
    return {
        "hit_rate": summary.hit_rate,
        "flops_skipped": summary.flops_skipped,
        "flop_bound": summary.flop_bound_speedup,
        "cache_mib": summary.cache_bytes / 2**20,
    }
