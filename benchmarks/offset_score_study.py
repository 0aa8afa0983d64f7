"""Does AdaCorrection's offset score predict the error of reusing a block's cache?

On the reference model, one full-computation generation records every block's input and
output at every step (conditional half of the CFG batch and unconditional half alike).
For each step t, block l and lag tau (the cache is tau steps old), the *true* error of
residual reuse is

    err = || (x_t + r_{t-tau}) - y_t || / || y_t - x_t ||      (r = y - x, the block's residual)

and the candidate predictors, all computed from the block *input* (no block compute), are
AdaCorrection's offset terms normalised as in ``adacache.ops.adacorrection_terms``:
temporal (Eq. 1), spatial (Eq. 2), S = temporal + lam * spatial (Eq. 3, lam = 1), and the
relative L1 change of the input, and the temporal term times the per-block scale that
``adacache.calibrate`` fits on other seeds (for residual and for output reuse). Reported: Spearman rank correlation with the true error across all
(t, tau, l), and within each (t, tau) across blocks (median over steps); and the error
level per step (late steps are where reuse hurts).

    python benchmarks/offset_score_study.py [--samples 20] [--lags 1 2 3 4] [--out study.json]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch
from scipy.stats import spearmanr

from adacache import AdaCorrection, FORA, calibrate, ops
from adacache.bench.tracks import CALIBRATION_SEEDS
from adacache.reference import load_reference_model, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--lags", type=int, nargs="*", default=[1, 2, 3, 4])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model = load_reference_model()
    # Per-block scales as adacache.calibrate fits them, on seeds disjoint from the scored ones.
    scales = {}
    for reuse in ("residual", "output"):
        base = FORA(interval=2, reuse=reuse)
        fitted = calibrate(model, AdaCorrection(base=base), lambda d: sample(
            d, [s % 10 for s in CALIBRATION_SEEDS], seeds=list(CALIBRATION_SEEDS), num_steps=args.steps, guidance_scale=args.guidance))
        scales[reuse] = [fitted.scales[f"transformer_blocks.{i}"] for i in range(len(model.transformer_blocks))]
    records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    hooks = []
    for index, block in enumerate(model.transformer_blocks):
        def pre(module, args, kwargs, index=index):
            module._adacache_in = kwargs.get("hidden_states", args[0] if args else None)

        def post(module, args, kwargs, output, index=index):
            records[index].append((module._adacache_in.detach().clone(), output.detach().clone()))

        hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(block.register_forward_hook(post, with_kwargs=True))
    labels = [i % 10 for i in range(args.samples)]
    with torch.inference_mode():
        sample(model, labels, seeds=list(range(args.samples)), num_steps=args.steps, guidance_scale=args.guidance)
    for h in hooks:
        h.remove()

    rows = []
    for block, steps in records.items():
        for t in range(len(steps)):
            x_t, y_t = steps[t]
            fresh = (y_t - x_t)
            for tau in args.lags:
                if t - tau < 0:
                    continue
                x_c, y_c = steps[t - tau]
                err = float((x_t + (y_c - x_c) - y_t).norm() / fresh.norm().clamp_min(1e-12))
                err_out = float((y_c - y_t).norm() / fresh.norm().clamp_min(1e-12))
                temporal, spatial = ops.adacorrection_terms(x_t, x_c)
                rel = float(ops.offset_score(x_t, x_c).max())
                rows.append({"block": block, "step": t, "lag": tau, "err": err, "err_output": err_out, "temporal": float(temporal.max()),
                             "spatial": float(spatial.max()), "S": float((temporal + spatial).max()), "input_rel_l1": rel,
                             "calibrated temporal": float(temporal.max()) * scales["residual"][block],
                             "calibrated temporal (output reuse)": float(temporal.max()) * scales["output"][block]})
    report = {"samples": args.samples, "steps": args.steps, "guidance": args.guidance, "lags": args.lags, "predictors": {},
              "calibration_seeds": list(CALIBRATION_SEEDS), "scales": scales}
    # (row label, predictor field, true-error field)
    predictors = [(name, name, "err") for name in ("temporal", "spatial", "S", "input_rel_l1", "calibrated temporal")]
    predictors += [("temporal (output reuse)", "temporal", "err_output"),
                   ("calibrated temporal (output reuse)", "calibrated temporal (output reuse)", "err_output")]
    for name, field, target in predictors:
        values = np.array([r[field] for r in rows])
        err = np.array([r[target] for r in rows])
        overall = spearmanr(values, err).statistic
        within = []
        for t in range(args.steps):
            for tau in args.lags:
                sel = [i for i, r in enumerate(rows) if r["step"] == t and r["lag"] == tau]
                if len(sel) > 2:
                    within.append(spearmanr(values[sel], err[sel]).statistic)
        report["predictors"][name] = {"spearman_all": float(overall), "spearman_within_step_median": float(np.nanmedian(within))}
    per_step = defaultdict(list)
    for r in rows:
        if r["lag"] == 1:
            per_step[r["step"]].append(r["err"])
    levels = {t: float(np.mean(v)) for t, v in sorted(per_step.items())}
    mid = np.median([v for t, v in levels.items() if args.steps * 0.3 <= t <= args.steps * 0.7])
    report["err_lag1_by_step"] = levels
    report["err_last5_over_mid"] = float(np.mean([levels[t] for t in list(levels)[-5:]]) / mid)
    print(f"{len(rows)} (step, lag, block) samples; Spearman correlation with the true reuse error:")
    for name, stats in report["predictors"].items():
        print(f"  {name:<36} all {stats['spearman_all']:+.2f}   within a step, across blocks (median) {stats['spearman_within_step_median']:+.2f}")
    print(f"reuse error at lag 1: last 5 steps / mid-trajectory = {report['err_last5_over_mid']:.1f}x")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
