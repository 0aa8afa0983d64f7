"""Speed of cached DiTs on a CUDA GPU: eager and torch.compile, fp32 and bf16.

For each model, precision and backend, in one process with the baseline timed just before
every variant run (paired ratios, as ``adacache bench`` forms them), times a generation of
``--steps`` steps at batch 2 (a CFG pair) with the inputs on the GPU, as a pipeline feeds
them (the timestep too). Each timed generation ends with ``torch.cuda.synchronize``.

Besides wall time it counts, in one untimed generation, the operations that made the host
wait for the GPU (``torch.cuda.set_sync_debug_mode``): a cache decision read on the host
stalls the launch queue, which is what decides whether caching pays on a small model.

    python benchmarks/gpu_speed.py [--models dit-s dit-xl] [--dtypes bf16 fp32]
        [--backends eager inductor] [--steps 50] [--repeats 5] [--out FILE]

Weights are random (no hub): speed does not depend on them, but the decisions of the
data-dependent policies (FirstBlockCache) do, so their hit rate is printed with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from typing import Any

import torch

import adacache
from adacache.bench.runner import Variant, machine_info, time_interleaved
from adacache.models import DiT, DiTConfig, init_dit_weights

CONFIGS = {"dit-s": DiTConfig.small, "dit-b": DiTConfig.base, "dit-xl": DiTConfig.xlarge, "tiny": DiTConfig.tiny}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
POLICIES = {
    "NoCache": lambda: adacache.NoCache(),
    "FORA(3)": lambda: adacache.FORA(interval=3),
    "TaylorSeer(1,5)": lambda: adacache.TaylorSeer(order=1, interval=5),
    "FirstBlockCache(0.1)": lambda: adacache.FirstBlockCache(threshold=0.1),  # random weights: see its hit rate
}


def build(name: str, dtype: torch.dtype, device: torch.device, input_size: int | None, batch: int,
          steps: int) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """A randomly initialised DiT with non-zero gates, and one input dict per step."""
    config = CONFIGS[name]()
    if input_size:
        config = dataclasses.replace(config, input_size=input_size)
    model = init_dit_weights(DiT(config))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adaLN-Zero's init makes every block the identity: give the gates values
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
    model = model.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=gen).to(device, dtype)
    # A CFG batch: conditional half, then the null class.
    y = torch.tensor([1] * (batch // 2) + [config.num_classes] * (batch - batch // 2), device=device)
    return model, [dict(x=x, timestep=t.expand(batch).to(device), class_labels=y) for t in torch.linspace(999, 0, steps).round()]


class ReadsTimestep(torch.nn.Module):
    """The original model plus one host read of the timestep per call: the read the runtime
    makes to tell steps, CFG slots and generations apart, timed alone."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        float(timestep.reshape(-1)[0])
        return self.model(x, timestep, class_labels)



def generate(denoiser: Any, feeds: list[dict[str, Any]]) -> torch.Tensor:
    """A sampler-shaped loop: the model's output feeds the next step's latent."""
    x = feeds[0]["x"]
    with torch.inference_mode():
        for kw in feeds:
            eps = denoiser(**dict(kw, x=x))
            x = x - 0.001 * eps[:, : x.shape[1]]
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return x


def host_syncs(denoiser: Any, feeds: list[dict[str, Any]]) -> int | None:
    """How many operations of one generation made the host wait for the GPU."""
    if not feeds[0]["x"].is_cuda:
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate(denoiser, feeds)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["dit-s", "dit-xl"], choices=sorted(CONFIGS))
    parser.add_argument("--dtypes", nargs="*", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--backends", nargs="*", default=["eager", "inductor"], choices=["eager", "inductor"])
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--input-size", type=int, default=None, help="latent side (default: the config's, 32 = 256px)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # what a serving stack runs fp32 with
    machine = machine_info()
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
        machine["cuda"] = torch.version.cuda
    results: dict[str, Any] = {"machine": machine, "steps": args.steps, "repeats": args.repeats, "runs": []}
    for model_name in args.models:
        for dtype_name in args.dtypes:
            model, feeds = build(model_name, DTYPES[dtype_name], device, args.input_size, args.batch, args.steps)
            for backend in args.backends:
                started = time.perf_counter()
                original = model if backend == "eager" else torch.compile(model, dynamic=False)
                baseline = Variant("original", "full", original)
                variants = [Variant("original + timestep read", "full", ReadsTimestep(original))]
                for name in args.policies:
                    cached = adacache.compile(model, POLICIES[name](), backend=backend)
                    variants.append(Variant(name, "adacache", cached, new_generation=cached.adacache.reset))
                for v in [baseline, *variants]:  # warm up: capture, compile, allocator
                    if v.new_generation:
                        v.new_generation()
                    generate(v.denoiser, feeds)
                compile_seconds = time.perf_counter() - started
                timings = time_interleaved(lambda d: generate(d, feeds), variants, baseline, args.repeats)
                run = {
                    "model": model_name, "dtype": dtype_name, "backend": backend,
                    "tokens": (feeds[0]["x"].shape[-1] // 2) ** 2, "batch": args.batch,
                    "warmup_seconds": round(compile_seconds, 1),
                    "baseline_ms_per_step": timings.baseline / args.steps * 1e3,
                    "baseline_host_syncs": host_syncs(original, feeds),
                    "variants": {},
                }
                for v in variants:
                    if v.new_generation is None:
                        run["variants"][v.name] = {"ms_per_step": timings.seconds[v.name] / args.steps * 1e3,
                                                   "speedup": timings.speedup[v.name], "host_syncs": host_syncs(v.denoiser, feeds)}
                        continue
                    v.new_generation()
                    syncs = host_syncs(v.denoiser, feeds)
                    summary = adacache.summary(v.denoiser)
                    run["variants"][v.name] = {
                        "ms_per_step": timings.seconds[v.name] / args.steps * 1e3,
                        "speedup": timings.speedup[v.name],
                        "flop_bound": summary.flop_bound_speedup,
                        "hit_rate": summary.hit_rate,
                        "host_syncs": syncs,
                    }
                results["runs"].append(run)
                if args.out:  # after every run: a run cut off by a time limit keeps what it measured
                    with open(args.out, "w") as fh:
                        json.dump(results, fh, indent=2)
                print(f"{model_name} {dtype_name} {backend}: original {run['baseline_ms_per_step']:.2f} ms/step, "
                      f"{run['baseline_host_syncs']} host syncs/generation (warm-up {compile_seconds:.0f} s)", flush=True)
                for name, row in run["variants"].items():
                    print(f"  {name:<25} {row['ms_per_step']:7.2f} ms/step  {row['speedup']:5.2f}x  "
                          f"bound {row.get('flop_bound', 1.0):5.2f}x  hit {row.get('hit_rate', 0.0):.2f}  syncs {row['host_syncs']}", flush=True)
                del original, variants, baseline
                torch._dynamo.reset()


if __name__ == "__main__":
    main()
