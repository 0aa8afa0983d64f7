"""AdaCorrection on the reference model: Table I's pattern, Table IV's ablation, Fig. 5's picture.

* Table I pattern: every base alone and with AdaCorrection (uncalibrated defaults; calibrated
  with two error tolerances; the blend band; the base's own reuse form), fidelity against full
  computation, wall-clock speedup (interleaved with full computation), FLOP bound, hit rate.
* Table IV: gamma in {0.5, 1, 2} x lambda in {0.5, 1, 2} with the paper's score (Eq. 3),
  calibrated once per lambda, over TaylorSeer(order=1, interval=5).
* Fig. 5: offset weight per block x step and hit rate per block, one generation, as a PNG.
* the seed-to-seed spread of full computation's class accuracy and FD-digits;
* Z-Cache against its base at the same setting (TaylorSeer intervals 3 / 5 / 8, calibrated
  TeaCache thresholds 0.1 / 0.2), with the wall-clock cost of reflection included.

Calibration always runs on seeds disjoint from the scored ones (``CALIBRATION_SEEDS``).

    python benchmarks/adacorrection_study.py [--samples 20] [--repeats 2] [--out bench-out/adacorrection]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import adacache
from adacache.bench import tracks
from adacache.bench.cli import parse_bench_policy
from adacache.bench.runner import machine_info
from adacache.bench.tracks import Calibrated
from adacache.policies.parse import parse_policy

BASES = (
    "FORA(interval=3)", "FORA(interval=6)",
    "FirstBlockCache(0.08)", "FirstBlockCache(0.12)",
    "TaylorSeer(order=1, interval=5)",
)
ABLATION_BASE = "TaylorSeer(order=1, interval=5)"
HEATMAP_POLICY = "AdaCorrection(base=FirstBlockCache(0.12))"


def table_one_variants(fitted_teacache: adacache.TeaCache) -> list[tuple[str, Any]]:
    bases: list[tuple[str, Any]] = [(text, parse_policy(text)) for text in BASES]
    bases.append(("TeaCache(0.1), calibrated", fitted_teacache))
    out: list[tuple[str, Any]] = []
    for text, base in bases:
        out.append((text, base))
        out.append((f"AdaCorrection(base={text})", adacache.AdaCorrection(base=base)))
        for veto in (0.2, 0.5):
            out.append((f"calibrated(AdaCorrection(base={text}, veto={veto}))", Calibrated(adacache.AdaCorrection(base=base, veto=veto))))
        out.append((f"calibrated(AdaCorrection(base={text}, veto=0.5, band=True))", Calibrated(adacache.AdaCorrection(base=base, veto=0.5, band=True))))
        # The paper's other direction: also reuse where the base would compute, when the predicted error is small.
        out.append((f"calibrated(AdaCorrection(base={text}, accept=0.05, veto=0.5))", Calibrated(adacache.AdaCorrection(base=base, accept=0.05, veto=0.5))))
        if text.startswith("FORA"):
            out.append((f"calibrated(AdaCorrection(base={text}, veto=0.5, reuse='base'))", Calibrated(adacache.AdaCorrection(base=base, veto=0.5, reuse="base"))))
    # AdaCorrection deciding alone: a base that caches every step and proposes no reuse.
    for tolerance in (0.05, 0.1):
        policy = adacache.AdaCorrection(base=adacache.FORA(interval=1), accept=tolerance, veto=tolerance)
        out.append((f"calibrated(AdaCorrection(base=FORA(interval=1), accept={tolerance}, veto={tolerance}))", Calibrated(policy)))
    return out


def zcache_variants(fitted: dict[float, adacache.TeaCache]) -> list[tuple[str, Any]]:
    """Z-Cache against its base at the same setting: TaylorSeer intervals, calibrated TeaCache
    thresholds; the paper's logarithmic weight and the linear one; and once with the final
    window reflected (the default leaves it alone)."""
    out: list[tuple[str, Any]] = []

    def with_zcache(label: str, base: Any) -> list[tuple[str, Any]]:
        return [(label, base), (f"ZCache(base={label})", adacache.ZCache(base=base)),
                (f"ZCache(base={label}, weight='linear')", adacache.ZCache(base=base, weight="linear"))]

    for interval in (3, 5, 7, 8):
        out += with_zcache(f"TaylorSeer(order=1, interval={interval})", adacache.TaylorSeer(order=1, interval=interval))
    final = adacache.TaylorSeer(order=1, interval=3)
    out.append(("ZCache(base=TaylorSeer(order=1, interval=3), reflect_final_window=True)", adacache.ZCache(base=final, reflect_final_window=True)))
    for threshold, tea in fitted.items():
        out += with_zcache(f"TeaCache({threshold}), calibrated", tea)
    return out


SPAN_VARIANTS = (
    "TaylorSeer(order=1, interval=4)", "TaylorSeer(order=1, interval=5)", "TaylorSeer(order=1, interval=6)",
    "calibrated(AdaCorrection(base=TaylorSeer(order=1, interval=5), veto=0.2, unit='span'))",
    "calibrated(AdaCorrection(base=TaylorSeer(order=1, interval=7), veto=0.3, unit='span'))",
    "calibrated(AdaCorrection(base=TaylorSeer(order=1, interval=8), veto=0.2, unit='span'))",
    "FORA(interval=2)", "FORA(interval=3)", "FORA(interval=4)",
    # Over FORA a veto of 0.2 never fires (the calibrated span score stays below it); 0.08 and
    # 0.15 over FORA(4) land between FORA's own intervals.
    "calibrated(AdaCorrection(base=FORA(interval=4), veto=0.08, unit='span', reuse='base'))",
    "calibrated(AdaCorrection(base=FORA(interval=4), veto=0.15, unit='span', reuse='base'))",
    "FirstBlockCache(0.03)", "FirstBlockCache(0.05)", "FirstBlockCache(0.08)",
    "calibrated(AdaCorrection(base=FirstBlockCache(0.12), veto=0.1, unit='span'))",
    "calibrated(AdaCorrection(base=FirstBlockCache(0.12), veto=0.2, unit='span'))",
    "calibrated(TeaCache(0.03))", "calibrated(TeaCache(0.05))", "calibrated(TeaCache(0.1))",
    "calibrated(AdaCorrection(base=TeaCache(0.1), veto=0.2, unit='span'))",
    "calibrated(AdaCorrection(base=TeaCache(0.2), veto=0.1, unit='span'))",
)


def span_variants() -> list[tuple[str, Any]]:
    """AdaCorrection deciding once per step for the base's span (``unit="span"``), against
    the base's own neighbouring settings at the same FLOP bound."""
    return [(text, parse_bench_policy(text)) for text in SPAN_VARIANTS]


def ablation_variants() -> list[tuple[str, Any]]:
    base = parse_policy(ABLATION_BASE)
    return [
        (f"calibrated(AdaCorrection(base={ABLATION_BASE}, score='paper', gamma={g}, lam={lam}, veto=0.5))",
         Calibrated(adacache.AdaCorrection(base=base, score="paper", gamma=g, lam=lam, veto=0.5)))
        for lam in (0.5, 1.0, 2.0) for g in (0.5, 1.0, 2.0)
    ]


def heatmap(policy_text: str, steps: int, guidance: float, out: Path) -> dict[str, Any]:
    """One generation of a calibrated policy; per block and step its offset weight and decision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from adacache.reference import load_reference_model, sample

    model = load_reference_model()
    policy = tracks.prepare_policy(Calibrated(parse_policy(policy_text)), model, steps, guidance)
    cached = adacache.compile(model, policy)
    labels = list(range(10))
    with adacache.session(cached) as sess, torch.inference_mode():
        sample(cached, labels, seeds=labels, num_steps=steps, guidance_scale=guidance)
        records = list(sess.stats.records)
    sites = cached.adacache.programs[0].cached_sites
    names = [s.name for s in sites]
    scales = [s.offset.gamma for s in sites]  # gamma * calibrated scale of each unit
    weight = np.full((len(sites), steps), np.nan)
    reused = np.zeros((len(sites), steps))
    for rec in records:
        for i, name in enumerate(names):
            if rec.step > 0:  # step 0 has no cache: its score compares against zeros
                weight[i, rec.step] = min(1.0, float(rec.scores[name].max()) * scales[i])
            reused[i, rec.step] = float(bool(rec.reused[name]))
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [4, 1]})
    im = ax0.imshow(weight, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ys, xs = np.nonzero(reused)
    ax0.scatter(xs, ys, s=4, c="cyan", marker="s", label="reused")
    ax0.set_xlabel("denoising step")
    ax0.set_ylabel("block")
    ax0.set_yticks(range(len(sites)), [s.label.rpartition(".")[2] for s in sites])
    ax0.set_title("correction weight w = clip(gamma * scale * S, 0, 1); cyan: cache reused")
    fig.colorbar(im, ax=ax0, fraction=0.03)
    ax1.barh(range(len(sites)), reused.mean(axis=1))
    ax1.invert_yaxis()
    ax1.set_yticks(range(len(sites)), [s.label.rpartition(".")[2] for s in sites])
    ax1.set_xlim(0, 1)
    ax1.set_title("hit rate per block")
    fig.suptitle(f"{policy_text}, calibrated; reference model, CFG {guidance}, {steps} DDIM steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return {"policy": policy_text, "hit_rate_per_block": reused.mean(axis=1).round(3).tolist(), "blocks": [s.label for s in sites]}


def seed_spread(samples: int, steps: int, guidance: float) -> dict[str, Any]:
    """Class accuracy and FD-digits of full computation on two disjoint seed sets of the bench's
    size: the spread a cached policy's distribution metrics are judged against."""
    from adacache.eval import metrics
    from adacache.reference import load_reference_model, sample

    model = load_reference_model()
    labels = [i % 10 for i in range(samples)]
    out = []
    for first in (0, samples):
        seeds = list(range(first, first + samples))
        with torch.inference_mode():
            images = sample(model, labels, seeds=seeds, num_steps=steps, guidance_scale=guidance)
        out.append({"seeds": [first, first + samples - 1], "accuracy": float(metrics.class_accuracy(images, torch.tensor(labels))),
                    "fd_digits": float(metrics.fd_digits(images))})
    return {"samples": samples, "runs": out, "fd_spread": abs(out[0]["fd_digits"] - out[1]["fd_digits"]),
            "accuracy_spread": abs(out[0]["accuracy"] - out[1]["accuracy"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-out/adacorrection")
    parser.add_argument("--figure", default="docs/adacorrection_layers.png")
    parser.add_argument("--spread-samples", type=int, default=50, help="seed set size for the full-computation spread (the bench's --samples)")
    parser.add_argument("--only", choices=["span"], help="run one part alone (span: unit='span' against the base sweeps)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    settings = tracks.QualitySettings(samples=args.samples, timing_samples=min(20, args.samples), steps=args.steps,
                                      guidance=(args.guidance,), repeats=args.repeats)
    from adacache.reference import load_reference_model

    span = tracks.quality_track(span_variants(), settings)
    (out / "span.json").write_text(json.dumps({"machine": {**machine_info(), "settings": {"samples": args.samples, "steps": args.steps,
                                               "guidance": args.guidance, "repeats": args.repeats}},
                                               "rows": [r.to_dict() for r in span]}, indent=2))
    if args.only == "span":
        for r in span:
            print(f"  {r.name:<100} {r.speedup or 0:5.2f}x  bound {r.flop_bound or 1:5.2f}x  {r.psnr or 0:7.2f} dB  hit {r.hit_rate or 0:.2f}")
        return
    model = load_reference_model()
    fitted = {th: tracks.prepare_policy(Calibrated(adacache.TeaCache(th)), model, args.steps, args.guidance) for th in (0.1, 0.2)}
    table_one = tracks.quality_track(table_one_variants(fitted[0.1]), settings)
    zcache = tracks.quality_track(zcache_variants(fitted), settings)
    ablation = tracks.quality_track(ablation_variants(), settings)
    layers = heatmap(HEATMAP_POLICY, args.steps, args.guidance, Path(args.figure))
    spread = seed_spread(args.spread_samples, args.steps, args.guidance)
    info = machine_info()
    info["elapsed_s"] = round(time.perf_counter() - start, 1)
    info["settings"] = {"samples": args.samples, "steps": args.steps, "guidance": args.guidance, "repeats": args.repeats}
    result = {"machine": info, "table_one": [r.to_dict() for r in table_one], "ablation": [r.to_dict() for r in ablation],
              "zcache": [r.to_dict() for r in zcache], "layers": layers, "seed_spread": spread}
    (out / "study.json").write_text(json.dumps(result, indent=2))
    for name, rows in (("Table I pattern", table_one), ("Z-Cache", zcache), ("Table IV ablation", ablation)):
        print(f"\n{name}")
        for r in rows:
            psnr = "failed: " + (r.note or "") if r.psnr is None else f"{r.psnr:7.2f} dB"
            print(f"  {r.name:<100} {r.speedup or 0:5.2f}x  bound {r.flop_bound or 1:5.2f}x  {psnr}  hit {r.hit_rate or 0:.2f}")
    print(f"\nwrote {out / 'study.json'} and {args.figure} in {info['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
