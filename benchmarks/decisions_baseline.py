"""Record, or compare against, what every policy decides and produces on the reference model.

The restructuring of the policies and passes (one method, one file) must not change
behaviour anywhere. This records, for each policy of a fixed matrix that covers every policy
type and option the passes branch on, the reuse decision of every site at every call, the
scores the graph emitted, and the images it made (a SHA-256 of their bytes, and PSNR against
full computation), on the shipped reference model with CFG. ``--compare`` re-runs the matrix
and lists every difference; a stage of the restructuring lands only when it lists none.

    python benchmarks/decisions_baseline.py --write benchmarks/results/decisions_baseline.json
    python benchmarks/decisions_baseline.py --compare benchmarks/results/decisions_baseline.json

Deterministic on one machine with one torch thread (set here); the hashes are bitwise, so a
baseline is only comparable on the machine and versions that wrote it (the file records them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

import adacache
from adacache.eval import metrics
from adacache.reference import load_reference_model, sample

#: One of each policy type, and each option that changes what the passes insert.
POLICIES = (
    "NoCache()",
    "FORA(interval=3)",
    "FORA(interval=3, reuse='residual')",
    "FORA(interval=3, granularity='module')",
    "FirstBlockCache(0.08)",
    "FirstBlockCache(0.08, probe_blocks=2, tail_blocks=1)",
    "TaylorSeer(order=1, interval=5)",
    "TaylorSeer(order=2, interval=7)",
    "TeaCache(0.1, coefficients=(1.0, 0.0))",
    "AdaCorrection(base=FORA(interval=3), veto=0.2)",
    "AdaCorrection(base=FORA(interval=3), veto=0.2, band=True)",
    "AdaCorrection(base=FirstBlockCache(0.08), veto=0.2)",
    "AdaCorrection(base=TaylorSeer(order=1, interval=5), veto=0.2)",
    "AdaCorrection(base=TaylorSeer(order=1, interval=5), veto=0.2, unit='span')",
    "AdaCorrection(base=TeaCache(0.1, coefficients=(1.0, 0.0)), veto=0.2)",
    "AdaCorrection(base=FORA(interval=1), accept=0.05, veto=0.05)",
    "ZCache(base=TaylorSeer(order=1, interval=5))",
)

LABELS = list(range(10))
SEEDS = list(range(10))
STEPS = 20
GUIDANCE = 4.0


def _digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.detach().contiguous().numpy().tobytes()).hexdigest()


def _scores_digest(scores: dict[str, torch.Tensor]) -> str:
    values = {site: [round(float(x), 6) for x in v.reshape(-1).tolist()] for site, v in sorted(scores.items())}
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]


def _generate(denoiser: Any) -> torch.Tensor:
    with torch.inference_mode():
        return sample(denoiser, LABELS, seeds=SEEDS, num_steps=STEPS, guidance_scale=GUIDANCE)


def record(policies: tuple[str, ...] = POLICIES) -> dict[str, Any]:
    """Decisions, scores and images of each policy (a failure is recorded, not raised)."""
    from adacache.policies.parse import parse_policy

    model = load_reference_model()
    reference = _generate(model)
    out: dict[str, Any] = {
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "setting": {"labels": LABELS, "seeds": SEEDS, "steps": STEPS, "guidance": GUIDANCE},
        "full": {"sha256": _digest(reference)},
        "policies": {},
    }
    for text in policies:
        try:
            compiled = adacache.compile(model, parse_policy(text))
            with adacache.session(compiled) as session:
                images = _generate(compiled)
            calls = [
                {
                    "step": rec.step, "slot": rec.slot,
                    "reused": {site: bool(v) for site, v in sorted(rec.reused.items())},
                    # Scores as a digest (rounded to 6 digits): a score that moves is a difference.
                    "scores": _scores_digest(rec.scores),
                }
                for rec in session.stats.records
            ]
            psnr = float(metrics.psnr(images, reference).mean())
            out["policies"][text] = {"sha256": _digest(images), "psnr": psnr if math.isfinite(psnr) else "inf", "calls": calls}
        except Exception as exc:  # noqa: BLE001 - a policy that fails is part of the baseline
            out["policies"][text] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"recorded {text}", file=sys.stderr)
    return out


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Every way ``after`` differs from ``before``: decisions first, then scores and images."""
    found = []
    if before["full"] != after["full"]:
        found.append("full computation's images differ: the baseline is from another machine or version")
    for text, old in before["policies"].items():
        new = after["policies"].get(text)
        if new is None:
            found.append(f"{text}: not recorded")
            continue
        if "error" in old or "error" in new:
            if old.get("error") != new.get("error"):
                found.append(f"{text}: error {old.get('error')!r} -> {new.get('error')!r}")
            continue
        if len(old["calls"]) != len(new["calls"]):
            found.append(f"{text}: {len(old['calls'])} calls -> {len(new['calls'])}")
        for index, (a, b) in enumerate(zip(old["calls"], new["calls"])):
            where = f"{text}: call {index} (step {a['step']}, slot {a['slot']})"
            if a["reused"] != b["reused"]:
                found.append(f"{where}: reused {a['reused']} -> {b['reused']}")
            elif a["scores"] != b["scores"]:
                found.append(f"{where}: scores differ")
        if old["sha256"] != new["sha256"]:
            found.append(f"{text}: images differ (PSNR {old['psnr']} -> {new['psnr']})")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", type=Path, help="record the matrix into this JSON file")
    action.add_argument("--compare", type=Path, help="record again and list every difference from this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    current = record()
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps(current, indent=1) + "\n")
        print(f"wrote {args.write}: {len(current['policies'])} policies")
        return 0
    found = differences(json.loads(args.compare.read_text()), current)
    for line in found:
        print(line)
    print(f"{len(found)} differences from {args.compare}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
