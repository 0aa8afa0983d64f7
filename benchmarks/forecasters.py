"""Forecasting bases at equal cost: TaylorSeer's powers against HiCache's scaled Hermite
polynomials, on the shipped reference model (DDIM, CFG, 50 steps).

Both run the same schedule (same full steps, same hit rate), so their cost is the same and
only fidelity is compared: PSNR against full computation of the same seeds. The contraction
factor is swept, since the reference implementation uses 0.5 on FLUX and 0.75 elsewhere.

    python benchmarks/forecasters.py [--samples 20] [--steps 50] [--out forecasters.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from adacache.bench.runner import machine_info
from adacache.reference import load_reference_model, sample
from schedule_phase import run

SIGMAS = (0.5, 0.75, 0.9, 1.0)


def variants() -> list[tuple[str, list[str]]]:
    """Per schedule: the TaylorSeer baseline, then HiCache at each contraction factor."""
    out = []
    for order in (1, 2):
        for interval in (3, 5, 7, 8, 10):
            taylor = f"TaylorSeer(order={order}, interval={interval})"
            out.append((taylor, [f"HiCache(order={order}, interval={interval}, sigma={s})" for s in SIGMAS]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="forecasters.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = load_reference_model()
    labels = [i % 10 for i in range(args.samples)]
    full = sample(model, labels, num_steps=args.steps)
    rows = []
    for taylor, hicache in variants():
        base = run(model, taylor, labels, args.steps, full)
        row = {"schedule": taylor, "taylor": base, "hicache": {}}
        for text in hicache:
            result = run(model, text, labels, args.steps, full)
            assert result["pattern"] == base["pattern"], f"{text} does not run {taylor}'s schedule"
            row["hicache"][text.split("sigma=")[1].rstrip(")")] = result
        rows.append(row)
        print(f"{taylor:40s} {base['psnr']:6.2f} dB ({base['computed_steps']} full)  " + "  ".join(
            f"sigma {s}: {r['psnr']:6.2f}" for s, r in row["hicache"].items()), flush=True)
    result = {"machine": machine_info(), "samples": args.samples, "steps": args.steps,
              "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
