"""``adacache bench``: the policy matrix, optionally with the anchors, in one command."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from adacache.arguments import accepted_by, finite_float, int_in, output_folder
from adacache.named_models import MODELS

QUICK_POLICIES = ("NoCache()", "FORA(interval=3)", "FirstBlockCache(0.08)")
FULL_POLICIES = (
    "NoCache()",
    "FORA(interval=2)", "FORA(interval=3)", "FORA(interval=4)", "FORA(interval=5)", "FORA(interval=6)",
    "FORA(interval=8)", "FORA(interval=10)",
    "FORA(interval=3, reuse='residual')", "FORA(interval=3, granularity='module')",
    "FirstBlockCache(0.03)", "FirstBlockCache(0.05)", "FirstBlockCache(0.08)", "FirstBlockCache(0.12)", "FirstBlockCache(0.2)",
    "TaylorSeer(order=1, interval=3)", "TaylorSeer(order=1, interval=4)", "TaylorSeer(order=1, interval=5)", "TaylorSeer(order=1, interval=6)",
    "TaylorSeer(order=1, interval=7)", "TaylorSeer(order=1, interval=8)",
    "TaylorSeer(order=2, interval=5)", "TaylorSeer(order=2, interval=7)", "TaylorSeer(order=1, interval=5, granularity='module')",
    "ZCache(base=TaylorSeer(order=1, interval=3))", "ZCache(base=TaylorSeer(order=1, interval=5))",
    "ZCache(base=TaylorSeer(order=1, interval=6))", "ZCache(base=TaylorSeer(order=1, interval=7))",
    "ZCache(base=TaylorSeer(order=1, interval=8))", "ZCache(base=TaylorSeer(order=1, interval=5), weight='linear')",
    "TeaCache(0.1)", "TeaCache(0.2)",
    "calibrated(TeaCache(0.05))", "calibrated(TeaCache(0.1))", "calibrated(TeaCache(0.2))", "calibrated(TeaCache(0.4))",
    # AdaCorrection over each base: the uncalibrated default, and calibrated at two error tolerances.
    "AdaCorrection(base=FirstBlockCache(0.08))",
    "calibrated(AdaCorrection(base=FORA(interval=3)))", "calibrated(AdaCorrection(base=FORA(interval=6), veto=0.5))",
    "calibrated(AdaCorrection(base=FirstBlockCache(0.08)))", "calibrated(AdaCorrection(base=FirstBlockCache(0.12)))",
    "calibrated(AdaCorrection(base=FirstBlockCache(0.2)))",
    "calibrated(AdaCorrection(base=TaylorSeer(order=1, interval=5)))", "calibrated(AdaCorrection(base=TaylorSeer(order=1, interval=5), veto=0.5))",
    "calibrated(AdaCorrection(base=TaylorSeer(order=1, interval=5), accept=0.05, veto=0.5))",
    "calibrated(AdaCorrection(base=TaylorSeer(order=1, interval=8), veto=0.5))",
    "calibrated(AdaCorrection(base=TeaCache(0.1)))", "calibrated(AdaCorrection(base=TeaCache(0.2)))",
    # ... deciding once per step for the base's span (unit='span'), at vetoes that fire on each base.
    "calibrated(AdaCorrection(base=TaylorSeer(order=1, interval=5), veto=0.2, unit='span'))",
    "calibrated(AdaCorrection(base=TaylorSeer(order=1, interval=7), veto=0.3, unit='span'))",
    "calibrated(AdaCorrection(base=FORA(interval=4), veto=0.08, unit='span', reuse='base'))",
    "calibrated(AdaCorrection(base=FORA(interval=4), veto=0.15, unit='span', reuse='base'))",
    "calibrated(AdaCorrection(base=FirstBlockCache(0.12), veto=0.1, unit='span'))",
    "calibrated(AdaCorrection(base=TeaCache(0.2), veto=0.1, unit='span'))",
    # ... accepting reuse the base refused, and deciding alone (a base that caches and never reuses).
    "calibrated(AdaCorrection(base=FORA(interval=3), accept=0.05, veto=0.5))",
    "calibrated(AdaCorrection(base=FORA(interval=1), accept=0.05, veto=0.05))",
    "calibrated(AdaCorrection(base=FORA(interval=1), accept=0.1, veto=0.1))",
)


#: Models the speed track can time: it drives adacache's own DiT (``x=`` inputs) directly.
SPEED_MODELS = ("dit-s", "dit-b", "tiny")


def _reference_train_steps() -> int | None:
    """The reference DDIM scheduler's training timesteps, the most sampling steps it can take."""
    config = Path(__file__).resolve().parent.parent / "reference" / "assets" / "dit" / "scheduler_config.json"
    try:
        return int(json.loads(config.read_text())["num_train_timesteps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no bound here; loading the reference model reports the missing assets


def add_bench_parser(sub: Any) -> None:
    """Register ``adacache bench`` on the main parser."""
    p = sub.add_parser(
        "bench",
        help="speed and fidelity of policies vs full computation (and vs diffusers / cache-dit with --anchors)",
        description="Runs policies x settings on the reference model (quality and speed) and on DiT-S/2 / DiT-B/2 "
        "sized random-weight models (speed only). Writes results.json, results.md and pareto.png. "
        "Measured on 2 CPU cores: --anchors --samples 50 --guidance 4.0 --speed-models dit-s took 30 minutes "
        "(BENCHMARKS.md); the default quadruples the samples, adds CFG 1.5 and the DiT-B/2 speed track, and was not timed.",
    )
    p.add_argument("--quick", action="store_true", help="3 policies, 20 samples, CFG 4.0 only, no speed track")
    p.add_argument("--anchors", action="store_true", help="also run diffusers' cache hooks and cache-dit on the same weights")
    p.add_argument("--policies", nargs="*", type=accepted_by(parse_bench_policy),
                   help="policy expressions, or calibrated(<policy>) to fit TeaCache / AdaCorrection "
                   "on the bench's sampler first (default: the built-in matrix)")
    # FD-digits needs a covariance of the samples' features, so at least two samples.
    p.add_argument("--samples", type=int_in(2, why=" (FD-digits needs at least 2)"), help="images scored per setting (default 200, quick 20)")
    max_steps = _reference_train_steps()
    p.add_argument("--steps", type=int_in(1, max_steps, why=" (the reference DDIM scheduler's training timesteps)" if max_steps else ""),
                   default=50)
    p.add_argument("--guidance", type=finite_float(0.0, why=" (1 = no guidance)"), nargs="*", help="CFG scales (default 4.0 1.5, quick 4.0)")
    p.add_argument("--repeats", type=int_in(1), help="timing repeats; the speedup is the median of paired ratios, each run against a full-computation run just before it (default 3, quick 2)")
    p.add_argument("--time-budget", type=finite_float(0.0), default=None,
                   help="seconds each timing run may spend on more pairs when its numbers have not settled: the "
                   "control (full computation timed against itself) must read 1.00x within 5%% and each variant's "
                   "paired ratios must not spread wider than 15%% of their median (default 120, quick 60; 0 times "
                   "only --repeats)")
    p.add_argument("--speed-models", nargs="*", choices=SPEED_MODELS, default=None,
                   help="speed-track models (default dit-s dit-b; none with --quick)")
    p.add_argument("--overhead", action="store_true",
                   help="per-step cost of caching that skips nothing, adacache and each anchor, on diffusers DiT-S/2 and DiT-B/2 (on by default with --anchors unless --quick)")
    p.add_argument("--overhead-models", nargs="*", choices=MODELS, default=["diffusers-dit-s", "diffusers-dit-b"])
    p.add_argument("--threads", type=int_in(1), default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=output_folder, default="bench-out")
    p.set_defaults(func=run_bench)


def parse_bench_policy(text: str) -> Any:
    """A policy expression, or ``calibrated(<policy>)``: fitted with ``adacache.calibrate`` on the
    bench's sampler at each guidance scale, on seeds disjoint from the scored ones."""
    from adacache.errors import PolicyError
    from adacache.policies.parse import parse_policy

    from .tracks import Calibrated

    stripped = text.strip()
    if stripped.startswith("calibrated(") and stripped.endswith(")"):
        policy = parse_policy(stripped[len("calibrated("):-1])
        # Refused here, not when the quality track reaches it after calibrating the others.
        if not policy.calibratable:
            raise PolicyError(f"calibrated({policy.describe()}): {type(policy).__name__} has no parameters to fit to a model")
        return Calibrated(policy)
    return parse_policy(stripped)


def run_bench(args: argparse.Namespace) -> int:
    from . import report, tracks
    from .runner import Settling, machine_info

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    policies = [(text, parse_bench_policy(text)) for text in (args.policies or (QUICK_POLICIES if args.quick else FULL_POLICIES))]
    settings = tracks.QualitySettings(
        # `is None`, not `or`: a given value is used as given (the parser refuses 0).
        samples=args.samples if args.samples is not None else (20 if args.quick else 200),
        timing_samples=min(20, args.samples if args.samples is not None else 20),
        steps=args.steps,
        guidance=tuple(args.guidance or ((4.0,) if args.quick else (4.0, 1.5))),
        repeats=args.repeats if args.repeats is not None else (2 if args.quick else 3),
        settle=Settling(time_budget=args.time_budget if args.time_budget is not None else (60.0 if args.quick else 120.0)),
    )
    extra = []
    if args.anchors:
        extra = _anchor_variants(quick=args.quick)
    quality = tracks.quality_track(policies, settings, extra)
    speed_models = args.speed_models if args.speed_models is not None else ([] if args.quick else ["dit-s", "dit-b"])
    plain = [(name, p) for name, p in policies if not isinstance(p, tracks.Calibrated)]
    speed = (tracks.speed_track(plain[:3], speed_models, steps=args.steps, repeats=settings.repeats, settle=settings.settle)
             if speed_models else [])
    overhead = []
    if args.overhead or (args.anchors and not args.quick):
        overhead = tracks.overhead_track(args.overhead_models, steps=min(args.steps, 20), repeats=settings.repeats,
                                         anchors=args.anchors, settle=settings.settle)
    info = machine_info()
    info["elapsed_s"] = round(time.perf_counter() - start, 1)
    info["settings"] = {"samples": settings.samples, "steps": settings.steps, "guidance": list(settings.guidance), "repeats": settings.repeats,
                        "time_budget_s": settings.settle.time_budget, "control_tolerance": settings.settle.control_tolerance,
                        "max_spread": settings.settle.max_spread}
    paths = report.write_results(args.out, quality, speed, info, overhead)
    print(report.quality_table(quality))
    if args.anchors:
        print(report.matched_table(quality))
    if speed:
        print(report.speed_table(speed))
    if overhead:
        print(report.overhead_table(overhead))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} in {info['elapsed_s']:.0f} s")
    warnings = report.unreliable_speed(quality, speed, overhead)
    if warnings:  # last, where a user looks; the numbers are still written, marked
        print("\nWARNING: speed numbers not to be trusted (marked ⚠ in the tables and speed_unreliable in results.json):")
        for line in warnings:
            print(f"  - {line}")
        print("  Rerun on a quiet machine, or give the timing more time (--time-budget, --repeats).")
    return 0


def _anchor_variants(quick: bool) -> list[Any]:
    from adacache.reference import load_reference_model

    from . import anchors
    from .runner import Variant

    variants = []
    for config in anchors.anchor_sweeps(quick=quick):
        model = load_reference_model()  # each anchor patches its own copy of the same weights
        try:
            run = anchors.apply_anchor(model, config)
        except anchors.AnchorUnavailable as exc:
            variants.append(Variant(config.label(), f"{config.system} {config.method}", None, error=f"unavailable: {exc}"))
            continue
        variants.append(Variant(config.label(), f"{config.system} {config.method}", run.denoiser,
                                new_generation=run.new_generation, stats=run.stats))
    return variants
