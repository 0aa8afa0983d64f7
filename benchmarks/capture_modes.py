"""capture='blocks' against whole-graph capture, on a model where both work.

For each model, in one process: the uncompiled model and the model compiled with the same
policy in each capture mode run the same denoising loop (``--steps`` calls over a decreasing
timestep schedule, one request each), interleaved round by round. Each round gives every
compiled variant's speedup over the uncompiled loop of the same round; medians over
``--repeats`` rounds are reported, with the blocks mode's speedup as a share of the graph
mode's (the goal: within 10%). The first call of a fresh compile (the capture) is timed in
each mode too.

    python benchmarks/capture_modes.py [--models dit-s diffusers-dit-s] [--policy "FORA(interval=2)"] \
        [--steps 10] [--repeats 15] [--threads 2] [--out capture_modes.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Any

import torch

import adacache
from adacache.bench.runner import machine_info
from adacache.named_models import load_named_model
from adacache.policies.parse import parse_policy

MODES = ("graph", "blocks")


def _loop(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], steps: int) -> float:
    runtime = getattr(type(model), "adacache", None)
    if runtime is not None:
        runtime.new_request(steps)
    start = time.perf_counter()
    for t in torch.linspace(999, 1, steps):
        model(*args, **dict(kwargs, timestep=torch.full_like(kwargs["timestep"], float(t))))
    return time.perf_counter() - start


def measure(name: str, policy_text: str, steps: int, repeats: int) -> dict[str, Any]:
    model, (args, kwargs) = load_named_model(name, batch=2)
    policy = parse_policy(policy_text)
    compiled, capture_s = {}, {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in MODES:
            compiled[mode] = adacache.compile(model, policy, capture=mode)
            start = time.perf_counter()
            compiled[mode](*args, **kwargs)
            capture_s[mode] = time.perf_counter() - start
            _loop(compiled[mode], args, kwargs, steps)  # warm
        _loop(model, args, kwargs, steps)
        rounds = []
        for _ in range(repeats):
            plain = _loop(model, args, kwargs, steps)
            rounds.append({mode: plain / _loop(compiled[mode], args, kwargs, steps) for mode in MODES})
    hits = {mode: adacache.summary(compiled[mode]).hit_rate for mode in MODES}
    speedup = {mode: statistics.median(r[mode] for r in rounds) for mode in MODES}
    return {
        "model": name,
        "policy": policy.describe(),
        "steps": steps,
        "repeats": repeats,
        "hit_rate": hits,
        "speedup": speedup,
        "blocks_share_of_graph_speedup": statistics.median(r["blocks"] / r["graph"] for r in rounds),
        "first_call_s": capture_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["dit-s", "diffusers-dit-s"])
    parser.add_argument("--policy", default="FORA(interval=2)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None)
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    rows = [measure(name, options.policy, options.steps, options.repeats) for name in options.models]
    for row in rows:
        print(
            f"{row['model']:<16} {row['policy']}: speedup graph {row['speedup']['graph']:.2f}x, blocks "
            f"{row['speedup']['blocks']:.2f}x (blocks = {row['blocks_share_of_graph_speedup']:.1%} of graph); hit rate "
            f"{row['hit_rate']['graph']:.0%} / {row['hit_rate']['blocks']:.0%}; first call "
            f"{row['first_call_s']['graph']:.2f} s / {row['first_call_s']['blocks']:.2f} s"
        )
    if options.out:
        with open(options.out, "w") as f:
            json.dump({"machine": machine_info(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
