"""The two benchmark tracks.

* quality track, on the shipped reference model (trained on digits): fidelity against
  full computation of the same seeds, distribution metrics, and interleaved timings;
* speed track, on DiT-S/2 and DiT-B/2 sized random-weight models: per-step speed only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import adacache
from adacache.policies.base import Policy

from .runner import Row, Settling, Variant, apply_timings, control_row, control_variant, policy_variant, time_interleaved


@dataclass
class QualitySettings:
    samples: int = 200          # fixed seeds x classes scored against full computation
    timing_samples: int = 20    # the batch that is timed
    steps: int = 50
    guidance: Sequence[float] = (4.0, 1.5)
    repeats: int = 3
    settle: Settling = field(default_factory=Settling)  # control, spread and extra-timing budget


@dataclass(frozen=True)
class Calibrated:
    """A policy to calibrate with :func:`adacache.calibrate` before it is scored.

    Every part that can be fitted is (``adacache.calibrate`` fits a TeaCache base first).
    The bench fits it once per guidance scale, on the bench's own sampler and on seeds
    disjoint from the scored ones (``CALIBRATION_SEEDS``), so the scores are held-out.
    """

    policy: Policy

    def describe(self) -> str:
        return f"calibrated({self.policy.describe()})"


CALIBRATION_SEEDS = tuple(range(10_000, 10_010))


def _named(policies: Sequence[Any]) -> list[tuple[str, Any]]:
    """Accept policies or ``(name, policy)`` pairs; a bare policy is named by ``describe()``."""
    return [(p[0], p[1]) if isinstance(p, tuple) else (p.describe(), p) for p in policies]


def prepare_policy(policy: Any, model: Any, steps: int, guidance: float) -> Policy:
    """The policy itself, or for :class:`Calibrated` the policy fitted on ``model`` at this guidance."""
    if not isinstance(policy, Calibrated):
        return policy
    from adacache.reference import sample

    labels = [s % 10 for s in CALIBRATION_SEEDS]
    return adacache.calibrate(model, policy.policy, lambda d: sample(d, labels, seeds=list(CALIBRATION_SEEDS), num_steps=steps, guidance_scale=guidance))


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False)
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()


def quality_track(
    policies: Sequence[Policy | Calibrated | tuple[str, Policy | Calibrated]],
    settings: QualitySettings,
    extra_variants: Sequence[Variant] = (),
    model: Any = None,
) -> list[Row]:
    """Score every policy (and extra variants, e.g. anchors) on the reference model."""
    from adacache.eval import metrics
    from adacache.reference import load_reference_model, sample

    model = model if model is not None else load_reference_model()
    labels = [i % 10 for i in range(settings.samples)]
    seeds = list(range(settings.samples))
    timing_labels = labels[: settings.timing_samples]
    timing_seeds = seeds[: settings.timing_samples]
    baseline = Variant("full computation", "full", model)
    rows: list[Row] = []
    for guidance in settings.guidance:
        # Built per guidance scale: a calibrated policy is fitted at the scale it is scored at.
        variants = [policy_variant(model, prepare_policy(p, model, settings.steps, guidance), name) for name, p in _named(policies)]
        variants += list(extra_variants)

        def generate(denoiser: Any, labels_: Sequence[int] = labels, seeds_: Sequence[int] = seeds) -> torch.Tensor:
            with torch.inference_mode():
                return sample(denoiser, labels_, seeds=seeds_, num_steps=settings.steps, guidance_scale=guidance)

        reference = generate(model)
        ref_stats = _distribution(reference, labels)
        rows.append(Row("full computation", "full", guidance, psnr=float("inf"), ssim=1.0, perceptual=0.0, **ref_stats))
        with _progress(len(variants), f"quality cfg={guidance}") as bar:
            for variant in variants:
                if variant.error:
                    rows.append(Row(variant.name, variant.family, guidance, note=variant.error))
                    continue
                try:
                    images, stats = _generate_with_stats(variant, lambda d: generate(d), _device(model))
                except Exception as exc:  # noqa: BLE001 - a failing variant is a row, not a crash
                    variant.error = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append(Row(variant.name, variant.family, guidance, note=variant.error))
                    continue
                row = Row(variant.name, variant.family, guidance, **_distribution(images, labels))
                row.psnr = float(metrics.psnr(images, reference).mean())
                row.ssim = float(metrics.ssim(images, reference).mean())
                row.perceptual = float(metrics.perceptual_distance(images, reference).mean())
                row.hit_rate = stats.get("hit_rate")
                row.flops_skipped = stats.get("flops_skipped")
                row.flop_bound = stats.get("flop_bound")
                row.cache_mib = stats.get("cache_mib")
                row.peak_mib = stats.get("peak_mib")
                row.note = stats.get("workaround")
                rows.append(row)
                if bar is not None and hasattr(bar, "update"):
                    bar.update(1)
        control = control_variant(baseline)
        timed = [*(v for v in variants if not v.error), control]
        with _progress(settings.repeats * len(timed), f"timing cfg={guidance}") as bar:
            timings = time_interleaved(
                lambda d: generate(d, timing_labels, timing_seeds), timed, baseline, settings.repeats, bar,
                control=control.name, settle=settings.settle,
            )
        rows.insert(next(i for i, r in enumerate(rows) if r.guidance == guidance) + 1, control_row(timings, guidance))
        for row in rows:
            if row.guidance != guidance:
                continue
            if row.family == "full":
                row.seconds, row.speedup = timings.baseline, 1.0
            elif row.name in timings.seconds:
                row.seconds = timings.seconds[row.name]
                apply_timings(row, timings, row.name)
                if row.flop_bound:
                    row.achieved_over_bound = row.speedup / row.flop_bound
    return rows


def _peak_memory(run: Any, device: torch.device) -> tuple[Any, float | None]:
    """``run()`` and the peak memory it allocated on a CUDA device, in MiB.

    CPU allocations go through the system allocator, which has no per-run peak counter,
    so on a CPU the peak is not reported (None) rather than estimated.
    """
    if device.type != "cuda":
        return run(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = run()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) / 2**20


def _generate_with_stats(variant: Variant, generate: Any, device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, dict[str, Any]]:
    if variant.policy is not None:
        # A fresh session, so the statistics are those of this generation alone.
        with adacache.session(variant.denoiser) as sess:
            images, peak = _peak_memory(lambda: generate(variant.denoiser), device)
            summary = adacache.summary(variant.denoiser, sess)
        return images, {
            "hit_rate": summary.hit_rate,
            "flops_skipped": summary.flops_skipped,
            "flop_bound": summary.flop_bound_speedup,
            "cache_mib": summary.cache_bytes / 2**20,
            "peak_mib": peak,
        }
    if variant.new_generation:
        variant.new_generation()
    images, peak = _peak_memory(lambda: generate(variant.denoiser), device)
    return images, {**(variant.stats() if variant.stats else {}), "peak_mib": peak}


def _device(model: Any) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _distribution(images: torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    from adacache.eval import metrics

    return {
        "accuracy": float(metrics.class_accuracy(images, torch.tensor(labels))),
        "fd_digits": float(metrics.fd_digits(images)),
    }


def speed_track(
    policies: Sequence[Policy | tuple[str, Policy]],
    configs: Sequence[str] = ("dit-s", "dit-b"),
    steps: int = 50,
    repeats: int = 3,
    extra: dict[str, Sequence[Variant]] | None = None,
    settle: Settling | None = None,
) -> list[Row]:
    """Per-step speed of each policy on random-weight DiT-S/2 and DiT-B/2 (32x32x4, batch 2)."""
    from adacache.named_models import load_named_model

    rows: list[Row] = []
    for config in configs:
        model, (_, kwargs) = load_named_model(config, batch=2)
        x0, labels = kwargs["x"], kwargs["class_labels"]

        def generate(denoiser: Any) -> torch.Tensor:
            x = x0
            with torch.inference_mode():
                for t in torch.linspace(999, 0, steps).round():
                    eps = denoiser(x=x, timestep=t.expand(2), class_labels=labels)
                    x = x - 0.001 * eps[:, : x.shape[1]]  # a stand-in for the scheduler update
            return x

        variants = [policy_variant(model, p, name) for name, p in _named(policies)] + list((extra or {}).get(config, ()))
        baseline = Variant("original", "full", model)
        for v in variants:  # capture outside the timing
            generate(v.denoiser)
        control = control_variant(baseline)
        with _progress(repeats * (len(variants) + 1), f"speed {config}") as bar:
            timings = time_interleaved(generate, [*variants, control], baseline, repeats, bar, control=control.name, settle=settle)
        rows.append(Row("original", "full", 0.0, seconds=timings.baseline, speedup=1.0, note=config))
        rows.append(control_row(timings, note=config))
        for v in variants:
            row = Row(v.name, v.family, 0.0, seconds=timings.seconds.get(v.name), note=config)
            if row.seconds:
                apply_timings(row, timings, v.name)
            if v.policy is not None:
                with adacache.session(v.denoiser) as sess:
                    generate(v.denoiser)
                    summary = adacache.summary(v.denoiser, sess)
                row.hit_rate, row.flop_bound = summary.hit_rate, summary.flop_bound_speedup
                if row.speedup:
                    row.achieved_over_bound = row.speedup / row.flop_bound
                row.extra["ms_per_step"] = 1e3 * row.seconds / steps if row.seconds else None
            rows.append(row)
    return rows


# Settings under which each anchor runs its machinery but (practically) never skips.
NEVER_SKIP = {
    "FirstBlockCache": {"threshold": 1e-9},
    "TaylorSeer": {"interval": 1},
    "MagCache": {"threshold": 1e-9},
    "PyramidAttentionBroadcast": {"interval": 1},
    "FasterCache": {"attention_interval": 1, "uncond_interval": 1},
    "SeaCache": {"threshold": 1e-9},
    "DBCache": {"threshold": 1e-9},
    "DBCache+TaylorSeer": {"threshold": 1e-9},
}


def overhead_track(configs: Sequence[str] = ("diffusers-dit-s", "diffusers-dit-b"), steps: int = 20, repeats: int = 3, anchors: bool = True,
                   settle: Settling | None = None) -> list[Row]:
    """Per-step cost of caching machinery that skips nothing: adacache NoCache and each anchor
    with a never-skip setting, against the bare model, on diffusers DiT-S/2 and DiT-B/2 sizes."""
    from adacache.named_models import load_named_model

    rows: list[Row] = []
    for config in configs:
        model, (_, kwargs) = load_named_model(config, batch=2)
        feeds = [dict(kwargs, timestep=t.expand(2).long()) for t in torch.linspace(999, 0, steps).round()]

        def generate(denoiser: Any) -> None:
            with torch.inference_mode():
                for kw in feeds:
                    denoiser(**kw)

        variants = [
            policy_variant(model, adacache.NoCache(), "adacache NoCache"),
            policy_variant(model, adacache.FORA(interval=1), "adacache FORA(interval=1), caches kept, nothing skipped"),
        ]
        runs = []
        if anchors:
            from . import anchors as anchor_mod

            for base in anchor_mod.anchor_sweeps(quick=True, num_inference_steps=steps):
                setting = base.with_params(**NEVER_SKIP.get(base.method, {}))
                copy_model, _ = load_named_model(config, batch=2)
                try:
                    run = anchor_mod.apply_anchor(copy_model, setting, instrument=False)
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    variants.append(Variant(setting.label(), f"{setting.system} {setting.method}", None, error=f"{type(exc).__name__}: {exc}"[:200]))
                    continue
                runs.append(run)
                variants.append(Variant(setting.label(), f"{setting.system} {setting.method}", run.denoiser, new_generation=run.new_generation))
        baseline = Variant("original", "full", model)
        for v in variants:
            if not v.error:
                try:
                    if v.new_generation:
                        v.new_generation()
                    generate(v.denoiser)
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    v.error = f"{type(exc).__name__}: {exc}"[:200]
        control = control_variant(baseline)
        with _progress(repeats * (len(variants) + 1), f"overhead {config}") as bar:
            timings = time_interleaved(generate, [*variants, control], baseline, repeats, bar, control=control.name, settle=settle)
        rows.append(Row("original", "full", 0.0, seconds=timings.baseline, speedup=1.0, note=config))
        control_ = control_row(timings, note=config)
        control_.extra["overhead"] = 1.0 / control_.speedup if control_.speedup else None
        rows.append(control_)
        for v in variants:
            row = Row(v.name, v.family, 0.0, seconds=timings.seconds.get(v.name), note=config if not v.error else f"{config}: {v.error}")
            if row.seconds:
                apply_timings(row, timings, v.name)
                row.extra["overhead"] = 1.0 / row.speedup
                row.extra["ms_per_step"] = 1e3 * row.seconds / steps
            rows.append(row)
        for run in runs:
            run.remove()
    return rows
