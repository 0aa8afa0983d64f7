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
from adacache.policies.static import FORA


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


@dataclass
class Timings:
    """Wall times of an interleaved run.

    ``speedup`` is the median over repeats of the *paired* ratio: each run of a variant
    divided into the baseline run timed just before it. A shared machine drifts over a long
    bench (minutes of slow phases); a pair sees the same phase, so the ratio survives it,
    where a ratio of medians taken at different times would not.
    """

    seconds: dict[str, float]
    baseline: float
    speedup: dict[str, float]


def time_interleaved(
    run: Callable[[Any], Any],
    variants: Sequence[Variant],
    baseline: Variant,
    repeats: int,
    progress: Any = None,
) -> Timings:
    """Wall time of ``run(denoiser)`` per variant, with the baseline timed just before every
    variant run, in an order that rotates each round (see :class:`Timings`)."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    ratios: dict[str, list[float]] = {v.name: [] for v in variants}
    base: list[float] = []
    for rep in range(repeats):
        order = list(variants[rep % max(1, len(variants)) :]) + list(variants[: rep % max(1, len(variants))])
        for variant in order:
            if variant.error:
                continue
            pair = []
            for target, sink in ((baseline, base), (variant, times[variant.name])):
                if target.new_generation:
                    target.new_generation()
                start = time.perf_counter()
                run(target.denoiser)
                pair.append(time.perf_counter() - start)
                sink.append(pair[-1])
            ratios[variant.name].append(pair[0] / pair[1])
            if progress is not None:
                progress.update(1)
    return Timings(
        seconds={k: statistics.median(v) for k, v in times.items() if v},
        baseline=statistics.median(base) if base else float("nan"),
        speedup={k: statistics.median(v) for k, v in ratios.items() if v},
    )


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
    if isinstance(base, FORA) and base.interval == 1:
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
