"""The issue's speed goal, checked on its own: >= 5x wall-clock at PSNR >= 30 dB, with class
accuracy and FD-digits no worse than full computation's by more than their seed-to-seed spread.

The bench times ~90 variants three times each over half an hour, and single rows there move by
20% between runs on this shared machine. Here only the candidates are timed, with more repeats,
each run paired with a full-computation run just before it (median of the paired ratios); the
fidelity uses the bench's seeds and sample count, and the spread two disjoint seed sets of
full computation of that size.

    python benchmarks/goal_check.py [--samples 50] [--repeats 7] [--out bench-out/goal_check.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from adacache.bench import tracks
from adacache.bench.runner import machine_info
from adacache.policies.parse import parse_policy
from adacorrection_study import seed_spread

CANDIDATES = ("TaylorSeer(order=1, interval=7)", "TaylorSeer(order=2, interval=7)", "FORA(interval=8)")
GOAL_SPEEDUP, GOAL_PSNR = 5.0, 30.0


def verdict(row: dict, full: dict, spread: dict) -> dict:
    """Which parts of the goal a candidate meets (FD-digits: lower is closer to real digits)."""
    checks = {
        "speedup": row["speedup"] is not None and row["speedup"] >= GOAL_SPEEDUP,
        "psnr": row["psnr"] is not None and row["psnr"] >= GOAL_PSNR,
        "accuracy": row["accuracy"] >= full["accuracy"] - spread["accuracy_spread"],
        "fd_digits": row["fd_digits"] <= full["fd_digits"] + spread["fd_spread"],
    }
    return {**checks, "met": all(checks.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50, help="the bench's sample count (fidelity and the spread)")
    parser.add_argument("--timing-samples", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-out/goal_check.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    settings = tracks.QualitySettings(samples=args.samples, timing_samples=args.timing_samples, steps=args.steps,
                                      guidance=(args.guidance,), repeats=args.repeats)
    rows = [r.to_dict() for r in tracks.quality_track([(text, parse_policy(text)) for text in CANDIDATES], settings)]
    spread = seed_spread(args.samples, args.steps, args.guidance)
    full = next(r for r in rows if r["family"] == "full")
    candidates = [{**r, "goal": verdict(r, full, spread)} for r in rows if r["family"] != "full"]
    info = machine_info()
    info["elapsed_s"] = round(time.perf_counter() - start, 1)
    info["settings"] = {"samples": args.samples, "timing_samples": args.timing_samples, "repeats": args.repeats,
                        "steps": args.steps, "guidance": args.guidance}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "full": full, "candidates": candidates, "seed_spread": spread}, indent=2))
    for r in candidates:
        print(f"{r['name']:<36} {r['speedup']:5.2f}x {r['psnr']:6.2f} dB acc {r['accuracy']:.3f} FD {r['fd_digits']:.0f}"
              f"  goal {'met' if r['goal']['met'] else 'not met'} {r['goal']}")
    print(f"full computation: acc {full['accuracy']:.3f} FD {full['fd_digits']:.0f}; spread FD {spread['fd_spread']:.0f}; wrote {out}")


if __name__ == "__main__":
    main()
