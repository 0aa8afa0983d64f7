"""Generate digits with the shipped reference DiT, with and without caching, and compare.

    python examples/quickstart.py [--policy "FORA(interval=3)"] [--samples 20]

Prints wall time of full computation and of the cached model (same process, interleaved),
the speedup, and the PSNR of the cached images against the full-compute images of the
same seeds; writes both grids to ``quickstart.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import adacache
from adacache.eval.metrics import psnr
from adacache.policies.parse import parse_policy
from adacache.reference import load_reference_model, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="FORA(interval=3)", help="a policy expression, e.g. 'FirstBlockCache(0.08)'")
    parser.add_argument("--samples", type=int, default=20, help="images per run (two per class)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--out", default="quickstart.png")
    args = parser.parse_args()

    model = load_reference_model()
    cached = adacache.compile(model, parse_policy(args.policy))
    labels = [i % 10 for i in range(args.samples)]
    seeds = list(range(args.samples))

    def run(denoiser):
        start = time.perf_counter()
        with torch.inference_mode():
            images = sample(denoiser, labels, seeds=seeds, num_steps=args.steps, guidance_scale=args.guidance)
        return images, time.perf_counter() - start

    run(cached)  # capture the graph once, outside the timing
    times = {"full": [], "cached": []}
    for _ in range(3):  # interleaved repeats; the median is reported
        full_images, t_full = run(model)
        cached_images, t_cached = run(cached)
        times["full"].append(t_full)
        times["cached"].append(t_cached)
    t_full, t_cached = (sorted(v)[1] for v in times.values())
    print(f"policy:   {parse_policy(args.policy).describe()}")
    print(f"full:     {t_full:.2f} s for {args.samples} images, {args.steps} DDIM steps, CFG {args.guidance}")
    print(f"cached:   {t_cached:.2f} s  ->  speedup {t_full / t_cached:.2f}x")
    print(f"fidelity: PSNR {psnr(cached_images, full_images).mean():.2f} dB against full computation")
    print(adacache.summary(cached).format(per_step=False))
    try:
        from adacache.reference.train import save_grid

        save_grid(torch.cat([full_images, cached_images]), Path(args.out), nrow=args.samples)
        print(f"wrote {args.out} (top: full computation, bottom: cached)")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
