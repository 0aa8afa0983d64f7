"""Where a fixed schedule's full steps fall, and how the loop around a policy is written.

Two tables, both on the shipped reference model (DDIM + classifier-free guidance, one batched
call per step), fidelity as PSNR against full computation of the same seeds. Equal computed
steps cost the same, so no timing is needed: each row reports how many steps computed.

* **Bare loop against explicit request** (issue 31): the compiled model called by a user's
  own loop that announces nothing, and inside ``adacache.session(model, total_steps=N)``; the
  reuse pattern of the first steps of each.
* **Phase**: every fixed-interval policy with its full steps counted from the first step
  (``anchor="start"``) and back from the last (``anchor="end"``, which needs the request's
  length), at several step counts (where ``total_steps - 1 - warmup`` is a multiple of the
  interval the two schedules are the same; those rows say so). With ``warmup=0`` an
  end-anchored schedule computes step 0 anyway (its caches are empty), one step more than
  the start-anchored one, so FORA is compared at ``warmup=1`` too, where both compute the
  same number of steps. The verdict per method counts only rows of different schedules and
  equal computed steps.

    python benchmarks/schedule_phase.py [--samples 20] [--steps 50 30 20] [--out schedule_phase.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import torch
from torch import nn

import adacache
from adacache.bench.runner import machine_info
from adacache.eval.metrics import psnr
from adacache.policies.parse import parse_policy
from adacache.reference import load_reference_model, sample

BARE_POLICIES = (
    "FORA(interval=3)", "FORA(interval=8)",
    "TaylorSeer(order=1, interval=5)", "TaylorSeer(order=2, interval=5)",
    "AdaCorrection(base=TaylorSeer(order=1, interval=5))", "FirstBlockCache(0.08)",
)


def phase_policies() -> list[str]:
    """Each fixed-interval configuration studied, without its anchor (added per row)."""
    out = [f"FORA(interval={n}, warmup={w})" for n in (2, 3, 4, 5, 6, 8) for w in (0, 1)]
    out += [f"TaylorSeer(order={order}, interval={n})" for order in (1, 2) for n in (3, 4, 5, 6, 8)]
    out += [f"AdaCorrection(base=TaylorSeer(order=1, interval={n}))" for n in (3, 5, 8)]
    out += [f"ZCache(base=TaylorSeer(order=1, interval={n}))" for n in (3, 5, 8)]
    out += [f"AdaCorrection(base=FORA(interval={n}, warmup=1))" for n in (3, 6)]
    return out


def with_anchor(text: str, anchor: str) -> str:
    """``text`` with ``anchor=`` set on its fixed-interval policy (the base of a wrapper)."""
    for name in ("FORA(", "TaylorSeer("):
        if name in text:
            head, tail = text.split(name, 1)
            return f"{head}{name}{tail.replace(')', f', anchor={anchor!r})', 1)}"
    raise ValueError(f"{text} has no fixed-interval schedule")


class BareLoop(nn.Module):
    """The compiled model behind a plain module: the sampler cannot announce requests, as in
    a user's own loop that calls the model and nothing else."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, **kwargs: Any) -> Any:
        return self.inner(**kwargs)


def run(model: nn.Module, text: str, labels: list[int], steps: int, full: torch.Tensor, bare: bool = False) -> dict[str, Any]:
    """One generation with ``text`` compiled; its fidelity, computed steps and reuse pattern."""
    compiled = adacache.compile(model, parse_policy(text))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images = sample(BareLoop(compiled) if bare else compiled, labels, num_steps=steps)
        summary = adacache.summary(compiled)
        rows = summary.per_step
    finally:
        adacache.uncompile(compiled)
    reused = [any(r["reused"].values()) for r in rows]
    return {
        "policy": text,
        "psnr": float(psnr(images, full)),
        "computed_steps": reused.count(False),
        "hit_rate": summary.hit_rate,
        "pattern": "".join("1" if r else "0" for r in reused),
        "steps": [r["step"] for r in rows],
    }


def method(text: str) -> str:
    """The row's method for the verdict: the policy and its base, with the Taylor order."""
    name = text.split("(")[0]
    base = "TaylorSeer" if "TaylorSeer" in text else "FORA"
    order = text.split("order=")[1][0] if "order=" in text else None
    inner = f"{base}(order={order})" if order else base
    return inner if name == base else f"{name}({inner})"


def verdict(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, over the rows whose anchors give different schedules of equal cost (the
    same computed steps and block-run hit rate within 1%: AdaCorrection's vetoes compute
    single blocks): how often each anchor kept more fidelity, and the mean PSNR difference
    (end minus start)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        start, end = row["start"], row["end"]
        if row["same_schedule"] or start["computed_steps"] != end["computed_steps"] or abs(start["hit_rate"] - end["hit_rate"]) > 0.01:
            continue
        entry = out.setdefault(method(row["policy"]), {"rows": 0, "start_better": 0, "end_better": 0, "mean_end_minus_start_db": 0.0})
        delta = row["end"]["psnr"] - row["start"]["psnr"]
        entry["rows"] += 1
        entry["start_better" if delta < 0 else "end_better"] += 1
        entry["mean_end_minus_start_db"] += delta
    for entry in out.values():
        entry["mean_end_minus_start_db"] = round(entry["mean_end_minus_start_db"] / entry["rows"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 30, 20], help="step counts; the first one also runs the bare-loop table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="schedule_phase.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = load_reference_model()
    labels = [i % 10 for i in range(args.samples)]
    full = {steps: sample(model, labels, num_steps=steps) for steps in args.steps}
    first = args.steps[0]

    bare_rows = []
    for text in BARE_POLICIES:
        row = {"policy": text}
        for how in ("bare", "explicit"):
            result = run(model, text, labels, first, full[first], bare=how == "bare")
            row[how] = {k: result[k] for k in ("psnr", "computed_steps", "pattern")}
            row[f"{how}_steps_counted"] = result["steps"] == list(range(first))
        bare_rows.append(row)
        print(f"{text:55s} bare {row['bare']['psnr']:6.2f} {row['bare']['pattern'][:12]}  "
              f"explicit {row['explicit']['psnr']:6.2f} {row['explicit']['pattern'][:12]}", flush=True)

    phase_rows = []
    for steps in args.steps:
        for text in phase_policies():
            row: dict[str, Any] = {"policy": text, "steps": steps}
            for anchor in ("start", "end"):
                result = run(model, with_anchor(text, anchor), labels, steps, full[steps])
                row[anchor] = {k: result[k] for k in ("psnr", "computed_steps", "hit_rate", "pattern")}
            row["same_schedule"] = row["start"]["pattern"] == row["end"]["pattern"]
            phase_rows.append(row)
            print(f"{steps:3d} {text:55s} start {row['start']['psnr']:6.2f} ({row['start']['computed_steps']})  "
                  f"end {row['end']['psnr']:6.2f} ({row['end']['computed_steps']}, {row['end']['hit_rate']:.0%} vs {row['start']['hit_rate']:.0%})" + ("  same" if row["same_schedule"] else ""), flush=True)

    result = {
        "machine": machine_info(),
        "samples": args.samples,
        "steps": args.steps,
        "guidance": 4.0,
        "seconds": round(time.perf_counter() - started, 1),
        "bare_loop": bare_rows,
        "phase": phase_rows,
        "verdict": verdict(phase_rows),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
