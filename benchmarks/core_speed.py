"""Speed of the core compiler on a DiT-S/2-sized model (issue: core compiler, performance).

Measures, in one process with the variants interleaved, the wall time of a 50-step
generation (batch 2 as in CFG, 32x32x4 latent, eager, CPU) for the original model,
``NoCache`` (captured and outlined, pass-through), ``FORA(interval=1)`` (caches kept and
refreshed every step, nothing skipped) and ``FORA(interval=3)``; prints the median ratios
and the FLOP bound, and writes them as JSON.

    python benchmarks/core_speed.py [--config small|base] [--steps 50] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import adacache
from adacache.models import DiT, DiTConfig, init_dit_weights


def generate(model, x, y, steps):
    timesteps = torch.linspace(999, 0, steps).round()
    with torch.inference_mode():
        for t in timesteps:
            eps = model(x, t.expand(x.shape[0]), y)
            x = x - 0.001 * eps[:, : x.shape[1]]  # a cheap stand-in for the scheduler update
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["small", "base"], default="small")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = DiTConfig.small() if args.config == "small" else DiTConfig.base()
    model = init_dit_weights(DiT(config)).eval()
    x = torch.randn(2, config.in_channels, config.input_size, config.input_size, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, config.num_classes])
    variants = {
        "original": model,
        "NoCache": adacache.compile(model, adacache.NoCache()),
        "FORA(1)": adacache.compile(model, adacache.FORA(interval=1)),  # caches kept, nothing skipped
        "FORA(3)": adacache.compile(model, adacache.FORA(interval=3)),
    }
    for name, m in variants.items():  # warm up: capture, allocator, first-touch
        generate(m, x, y, 3)
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]  # rotate to spread drift
        for name in order:
            start = time.perf_counter()
            generate(variants[name], x, y, args.steps)
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    with adacache.session(variants["FORA(3)"]) as sess:  # a clean session: one generation's hit rate
        generate(variants["FORA(3)"], x, y, args.steps)
        summary = adacache.summary(variants["FORA(3)"], sess)
    result = {
        "config": args.config,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "median_seconds": median,
        "nocache_overhead": median["NoCache"] / median["original"],
        "fora1_overhead": median["FORA(1)"] / median["original"],
        "fora3_speedup": median["original"] / median["FORA(3)"],
        "fora3_flop_bound": summary.flop_bound_speedup,
        "fora3_achieved_over_bound": (median["original"] / median["FORA(3)"]) / summary.flop_bound_speedup,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
    }
    print(f"DiT-{args.config[0].upper()}/2, {args.steps} steps, batch 2, eager CPU, median of {args.repeats}:")
    for k, v in median.items():
        print(f"  {k:<9} {v:7.3f} s  ({v / args.steps * 1e3:6.1f} ms/step)")
    print(f"  NoCache overhead: {result['nocache_overhead']:.3f}x (goal <= 1.03x)")
    print(f"  FORA(1) overhead (caches kept, nothing skipped): {result['fora1_overhead']:.3f}x")
    print(f"  FORA(3) speedup:  {result['fora3_speedup']:.2f}x, FLOP bound {result['fora3_flop_bound']:.2f}x, "
          f"achieved/bound {result['fora3_achieved_over_bound']:.2f} (goal >= 2.6x)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
