"""What the guards cost: the model fingerprint checked at each request start, the registration
counter checked at every call, both against the time of one denoising step.

For each model, in one process, interleaved: one full call of the compiled model (``NoCache``,
the step a guard protects), the full fingerprint comparison a request start runs, and the
per-call program lookup with its counter check. Medians over ``--repeats`` rounds; the ratios
are taken per round and their median reported.

    python benchmarks/guard_cost.py [--models dit-s diffusers-dit-s diffusers-dit-s+lora] [--repeats 20] [--out guard_cost.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

import adacache
from adacache.bench.runner import machine_info
from adacache.named_models import load_named_model
from adacache.runtime import guards


def _seconds(fn: Any, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def measure(name: str, repeats: int) -> dict[str, Any]:
    base, _, extra = name.partition("+")
    model, (args, kwargs) = load_named_model(base, batch=2)
    if extra == "lora":  # rank-8 LoRA on every attention projection: the per-call watch grows with it
        from peft import LoraConfig, inject_adapter_in_model

        targets = ["to_q", "to_k", "to_v", "to_out.0"] if base.startswith("diffusers-") else ["qkv", "proj"]
        model = inject_adapter_in_model(LoraConfig(r=8, target_modules=targets), model)
    compiled = adacache.compile(model, adacache.NoCache())
    runtime = compiled.adacache
    stats = runtime.current_session().stats
    with torch.no_grad():
        compiled(*args, **kwargs)  # capture once
        program = runtime.programs[0]

        def step() -> None:
            compiled(*args, **kwargs)

        def request_check() -> None:  # what a request start adds: fingerprint the model and compare
            assert program.fingerprint.difference(guards.ModelFingerprint.of(model)) is None

        def call_check() -> None:  # what every call does to find its program, counter check included
            runtime.program_for(args, kwargs, stats, check_model=False)

        rows = []
        for _ in range(repeats):
            rows.append((_seconds(step, 3), _seconds(request_check, 20), _seconds(call_check, 200)))
    modules = sum(1 for _ in model.modules())
    step_s = statistics.median(r[0] for r in rows)
    return {
        "model": name,
        "modules": modules,
        "tensors": sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers()),
        "step_ms": step_s * 1e3,
        "request_check_ms": statistics.median(r[1] for r in rows) * 1e3,
        "call_lookup_us": statistics.median(r[2] for r in rows) * 1e6,
        "request_check_pct_of_step": statistics.median(r[1] / r[0] for r in rows) * 100,
        "call_lookup_pct_of_step": statistics.median(r[2] / r[0] for r in rows) * 100,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["dit-s", "diffusers-dit-s", "diffusers-dit-s+lora"],
                        help="named models; '+lora' adds a PEFT LoRA to every attention projection")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure(name, args.repeats) for name in args.models]
    print("| model | modules | step (ms) | request-start check (ms) | % of a step | per-call lookup (µs) | % of a step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['modules']} | {r['step_ms']:.1f} | {r['request_check_ms']:.2f} | "
              f"{r['request_check_pct_of_step']:.2f}% | {r['call_lookup_us']:.1f} | {r['call_lookup_pct_of_step']:.3f}% |")
    print(json.dumps(machine_info()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results, "repeats": args.repeats, "machine": machine_info()}, f, indent=2)


if __name__ == "__main__":
    main()
