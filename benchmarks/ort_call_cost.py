"""Where a cached ONNX Runtime call spends its time (issue 20: ONNX Runtime's per-call cost).

For each model, in one process, interleaved round by round, one call each of:

* ``plain``: the plain ONNX export of the model (``session.run``);
* ``compute`` / ``reuse``: the cached export run directly with ``session.run`` (every input,
  cache state included, passed as a numpy feed), its reuse flag off (the If's computing
  branch) and on over a valid cache (the reusing branch);
* ``engine compute`` / ``engine reuse``: the two steps of a request through ``adacache.load``'s
  engine (step tracking, input checks, IOBinding with the cache state kept in ORT's buffers);
* the engine's own Python per call (input checks, the step plan, binding the inputs).

Medians over ``--repeats`` rounds of ``--inner`` calls each; what each part costs is reported
against the plain call.

    python benchmarks/ort_call_cost.py [--models tiny dit-s reference] [--policy "FORA(interval=2)"] [--repeats 15] [--inner 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import adacache
from adacache.backends.onnx import export_plain_onnx
from adacache.bench.runner import machine_info
from adacache.named_models import load_named_model
from adacache.policies.parse import parse_policy

VARIANTS = ("plain", "compute", "reuse", "engine compute", "engine reuse")


def _seconds(call: Callable[[], Any], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        call()
    return (time.perf_counter() - start) / inner


def measure(name: str, policy_text: str, repeats: int, inner: int, folder: Path) -> dict[str, Any]:
    import onnxruntime as ort

    model, (args, kwargs) = load_named_model(name, batch=2)
    compiled = adacache.compile(model, parse_policy(policy_text))
    adacache.export(compiled, folder / name, example_inputs=(args, kwargs))
    export_plain_onnx(model, folder / f"{name}-plain.onnx", (args, kwargs))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    plain = ort.InferenceSession(str(folder / f"{name}-plain.onnx"), options, providers=["CPUExecutionProvider"])
    cached = ort.InferenceSession(str(folder / name / "model.onnx"), options, providers=["CPUExecutionProvider"])
    engine = adacache.load(folder / name, provider="cpu", session_options=options)
    manifest = engine.manifest

    user = {spec["name"]: kwargs[spec["name"]].numpy() for spec in manifest["inputs"] if spec["role"] == "user"}
    plain_feeds = {i.name: user[i.name] for i in plain.get_inputs()}
    states = {s["name"]: np.zeros(s["shape"], dtype=np.bool_ if s["dtype"] == "bool" else np.float32) for s in manifest["states"]}
    controls = [c["name"] for c in manifest["controls"]]
    outputs = [o["name"] for o in manifest["outputs"]]
    state_outputs = {s["output"]: s["name"] for s in manifest["states"]}

    def run_cached(allow: bool) -> list[np.ndarray]:
        feeds = {**user, **{c: np.asarray(allow) for c in controls}, **states}
        return cached.run(outputs, feeds)

    # One computing call fills the cache (and makes it valid) for the reusing calls.
    warm = dict(zip(outputs, run_cached(False)))
    states.update({state_outputs[o]: warm[o] for o in state_outputs})
    assert bool(run_cached(True)[outputs.index(next(s["name"] for s in manifest["signals"] if s["name"].endswith("reused")))])

    # The engine: a request of two steps under FORA(interval=2) computes, then reuses.
    feeds = [{**user, "timestep": np.full_like(user["timestep"], t)} for t in (900, 880)]

    def engine_pair() -> tuple[float, float]:
        engine.new_request()
        first = _seconds(lambda: engine(**feeds[0]), 1)
        second = _seconds(lambda: engine(**feeds[1]), 1)
        return first, second

    engine_pair()
    assert engine.reused and all(count == 1 for count in engine.reused.values()), "the second call reuses"

    calls = {"plain": lambda: plain.run(None, plain_feeds), "compute": lambda: run_cached(False), "reuse": lambda: run_cached(True)}
    for call in calls.values():
        call()
    rows = []
    for _ in range(repeats):
        row = {k: _seconds(call, inner) for k, call in calls.items()}
        pairs = [engine_pair() for _ in range(inner)]
        row["engine compute"] = statistics.median(p[0] for p in pairs)
        row["engine reuse"] = statistics.median(p[1] for p in pairs)
        rows.append(row)
    ms = {k: statistics.median(r[k] for r in rows) * 1e3 for k in VARIANTS}
    # The loader's own Python per call: input checks, the step tracker's plan, binding the inputs.
    binding = engine.requests.plan(500.0).buffers.bindings[0]

    def python_part() -> None:
        arrays = engine._check_inputs(user)
        engine.requests.plan(engine._timestep(arrays))
        for key, value in arrays.items():
            binding.bind_cpu_input(key, value)

    python_us = statistics.median(_seconds(python_part, inner * 10) for _ in range(repeats)) * 1e6
    return {
        "model": name,
        "policy": compiled.adacache.policy.describe(),
        "repeats": repeats,
        "inner": inner,
        "ms": ms,
        "compute_over_plain": statistics.median(r["compute"] / r["plain"] for r in rows),
        "reuse_over_plain": statistics.median(r["reuse"] / r["plain"] for r in rows),
        "loader_ms": {"compute": ms["engine compute"] - ms["compute"], "reuse": ms["engine reuse"] - ms["reuse"]},
        "loader_python_us": python_us,
        "fora2_step_over_plain": statistics.median((r["engine compute"] + r["engine reuse"]) / (2 * r["plain"]) for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["tiny", "dit-s", "reference"])
    parser.add_argument("--policy", default="FORA(interval=2)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(name, options.policy, options.repeats, options.inner, Path(folder)) for name in options.models]
    for r in rows:
        ms = r["ms"]
        print(f"{r['model']:<10} plain {ms['plain']:.3f} ms | cached graph: compute {ms['compute']:.3f} ms "
              f"({r['compute_over_plain']:.2f}x plain), reuse {ms['reuse']:.3f} ms ({r['reuse_over_plain']:.2f}x) | "
              f"engine: compute {ms['engine compute']:.3f}, reuse {ms['engine reuse']:.3f} ms (loader "
              f"{r['loader_ms']['compute'] * 1e3:.0f} / {r['loader_ms']['reuse'] * 1e3:.0f} us, of which Python "
              f"{r['loader_python_us']:.0f} us) | FORA(2) step "
              f"{r['fora2_step_over_plain']:.2f}x plain")
    if options.out:
        Path(options.out).write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
