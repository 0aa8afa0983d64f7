"""Does the cached/uncached speed ratio survive compilation and export? (deployment issue)

For each model, in one process with variants interleaved, times a generation of
``--steps`` steps for:

* eager: original vs cached (the reference ratio), and the captured graph with nothing cached
  (``NoCache``) vs cached: the same ratio without the original module's Python dispatch;
* torch.compile (inductor): compiled original vs ``adacache.compile(..., backend="inductor")``;
* ONNX Runtime (CPU): a plain ONNX export of the original vs the cached export run by
  ``adacache.load``.

    python benchmarks/backends_speed.py [--models reference dit-s] [--policy "FORA(interval=3)"] [--steps 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import adacache
from adacache.backends.onnx import export_plain_onnx
from adacache.bench.runner import machine_info
from adacache.named_models import load_named_model
from adacache.policies.parse import parse_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["reference", "dit-s"])
    parser.add_argument("--policy", default="FORA(interval=3)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    results = {"machine": machine_info(), "policy": args.policy, "steps": args.steps, "models": {}}
    for name in args.models:
        model, (_, kwargs) = load_named_model(name, args.batch)
        time_key = "timestep"
        timesteps = torch.linspace(999, 0, args.steps).round()
        if name != "reference":
            timesteps = timesteps.float()
        feeds = [dict(kwargs, **{time_key: t.expand(args.batch).to(kwargs[time_key].dtype)}) for t in timesteps]

        def torch_run(denoiser, feeds=feeds):
            with torch.inference_mode():
                for kw in feeds:
                    denoiser(**kw)

        eager_cached = adacache.compile(model, parse_policy(args.policy))
        # The captured graph with nothing cached: the eager baseline without the original
        # module's Python dispatch, which ONNX Runtime and inductor never pay either.
        eager_graph = adacache.compile(model, adacache.NoCache())
        compiled_plain = torch.compile(model, backend="inductor", dynamic=False)
        compiled_cached = adacache.compile(model, parse_policy(args.policy), backend="inductor")
        tmp = Path(tempfile.mkdtemp())
        adacache.export(eager_cached, tmp / "cached", example_inputs=((), feeds[0]))
        export_plain_onnx(model, tmp / "plain.onnx", ((), feeds[0]))
        engine = adacache.load(tmp / "cached", provider="cpu", session_options=options)
        plain = ort.InferenceSession(str(tmp / "plain.onnx"), options, providers=["CPUExecutionProvider"])
        np_feeds = [{k: v.numpy() for k, v in kw.items()} for kw in feeds]
        plain_names = [i.name for i in plain.get_inputs()]

        def ort_plain():
            for kw in np_feeds:
                plain.run(None, {n: kw[n] for n in plain_names})

        def ort_cached():
            engine.reset()
            for kw in np_feeds:
                engine(**kw)

        variants = {
            "eager original": lambda: torch_run(model),
            "eager cached": lambda: (eager_cached.adacache.reset(), torch_run(eager_cached)),
            "eager graph": lambda: (eager_graph.adacache.reset(), torch_run(eager_graph)),
            "inductor original": lambda: torch_run(compiled_plain),
            "inductor cached": lambda: (compiled_cached.adacache.reset(), torch_run(compiled_cached)),
            "ort original": ort_plain,
            "ort cached": ort_cached,
        }
        for fn in variants.values():  # compile / warm up outside the timing
            fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for rep in range(args.repeats):
            for key in names[rep % len(names):] + names[: rep % len(names)]:
                start = time.perf_counter()
                variants[key]()
                times[key].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios = {b: med[f"{b} original"] / med[f"{b} cached"] for b in ("eager", "inductor", "ort")}
        ratios["eager graph"] = med["eager graph"] / med["eager cached"]
        results["models"][name] = {
            "median_seconds": med,
            "speedup": ratios,
            "kept_under_compile": ratios["inductor"] / ratios["eager"],
            "kept_under_ort": ratios["ort"] / ratios["eager"],
            "ort_over_eager_graph": ratios["ort"] / ratios["eager graph"],
        }
        print(f"{name}: {args.policy}, {args.steps} steps, batch {args.batch}, median of {args.repeats}")
        for k, v in med.items():
            print(f"  {k:<18} {v:8.3f} s")
        print(f"  speedup eager {ratios['eager']:.2f}x, inductor {ratios['inductor']:.2f}x, ONNX Runtime {ratios['ort']:.2f}x "
              f"(ORT keeps {ratios['ort'] / ratios['eager']:.2f} of the eager ratio; goal >= 0.9); against the captured graph "
              f"with nothing cached, eager {ratios['eager graph']:.2f}x (ORT keeps {ratios['ort'] / ratios['eager graph']:.2f})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
