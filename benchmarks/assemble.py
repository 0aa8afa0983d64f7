"""Assemble BENCHMARKS.md from the JSON files that benchmarks/regenerate.sh writes.

    python benchmarks/assemble.py bench-out BENCHMARKS.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from adacache.bench import report
from adacache.bench.runner import Row


def _rows(items: list[dict]) -> list[Row]:
    return [Row(**item) for item in items]


def _goal_section(goal: dict) -> list[str]:
    st = goal["machine"]["settings"]
    full, spread = goal["full"], goal["seed_spread"]
    parts = ["## The ≥ 5x at ≥ 30 dB goal, timed on its own", "",
             f"`python benchmarks/goal_check.py --samples {st['samples']} --repeats {st['repeats']}` on the reference model"
             f" (CFG {st['guidance']}, DDIM {st['steps']} steps): fidelity on the bench's {st['samples']} samples; speedup the median"
             f" of {st['repeats']} paired ratios ({st['timing_samples']} samples, each run divided into a full-computation run timed"
             " just before it). Goal: ≥ 5x at ≥ 30 dB PSNR, class accuracy and FD-digits (lower is closer to real digits) no worse"
             f" than full computation's by more than the seed-to-seed spread (full computation: {100 * full['accuracy']:.1f}%,"
             f" FD-digits {full['fd_digits']:.0f}; spread {100 * spread['accuracy_spread']:.1f} points and {spread['fd_spread']:.0f}).", "",
             "| candidate | speedup | FLOP bound | PSNR dB | class acc. | FD-digits | goal |", "|---|---|---|---|---|---|---|"]
    for r in goal["candidates"]:
        missed = [k for k, ok in r["goal"].items() if k != "met" and not ok]
        verdict = "met" if r["goal"]["met"] else "not met: " + ", ".join(missed)
        parts.append(f"| {r['name']} | {r['speedup']:.2f}x | {r['flop_bound']:.2f}x | {r['psnr']:.2f} | {100 * r['accuracy']:.1f}% |"
                     f" {r['fd_digits']:.0f} | {verdict} |")
    return parts + [""]


STUDY_HEADER = ["| variant | wall speedup | FLOP bound | PSNR dB | SSIM | hit rate | FD-digits |", "|---|---|---|---|---|---|---|"]


def _study_rows(rows: list[dict]) -> list[str]:
    """The study's variant tables, one line per row (full computation is the reference, not a row)."""

    def fmt(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    lines = []
    for r in rows:
        if r["family"] == "full":
            continue
        if r.get("note") and r["psnr"] is None:
            lines.append(f"| {r['name']} | failed: {r['note']} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {fmt(r['speedup'], '.2f')}x | {fmt(r['flop_bound'], '.2f')}x | {fmt(r['psnr'], '.2f')} |"
                     f" {fmt(r['ssim'], '.4f')} | {fmt(r['hit_rate'] and 100 * r['hit_rate'], '.1f')}% | {fmt(r['fd_digits'], '.0f')} |")
    return lines


def _span_section(span: dict) -> list[str]:
    st = span["machine"]["settings"]
    parts = ["**AdaCorrection deciding once per step (`unit='span'`) against the base's own settings**"
             f" (`python benchmarks/adacorrection_study.py --only span --samples {st['samples']} --repeats {st['repeats']}`, part of the"
             " full study run): one offset score of the span's input per step instead of one per block; compare rows at the same"
             " FLOP bound.", "", *STUDY_HEADER, *_study_rows(span["rows"])]
    return parts + [""]


def _adacorrection_section(study: dict) -> list[str]:
    settings = study["machine"]["settings"]
    parts = ["## The seed methods on their bases: AdaCorrection (Table I pattern, Table IV ablation, Fig. 5) and Z-Cache", "",
             f"`python benchmarks/adacorrection_study.py --samples {settings['samples']} --repeats {settings['repeats']}` on the reference"
             f" model (CFG {settings['guidance']}, DDIM {settings['steps']} steps). `calibrated(...)`: per-block scales fitted by"
             " `adacache.calibrate` on 10 other seeds, so `veto` is a tolerance on the predicted relative reuse error. FLOP bound:"
             " the speedup if only block compute counted; wall: measured, interleaved with full computation.", "",
             *STUDY_HEADER, *_study_rows(study["table_one"])]
    parts += ["", "**Table IV pattern** (paper score S = temporal + lambda * spatial, calibrated per lambda, veto 0.5, over"
              " TaylorSeer(order=1, interval=5)): PSNR dB / hit rate", "", "| lambda \\ gamma | 0.5 | 1 | 2 |", "|---|---|---|---|"]
    grid: dict[str, dict[str, str]] = {}
    for r in study["ablation"]:
        if r["family"] == "full" or r["psnr"] is None:
            continue
        gamma = r["name"].split("gamma=")[1].split(",")[0]
        lam = r["name"].split("lam=")[1].split(",")[0]
        grid.setdefault(lam, {})[gamma] = f"{r['psnr']:.2f} / {100 * r['hit_rate']:.0f}%"
    for lam in sorted(grid, key=float):
        parts.append(f"| {lam} | " + " | ".join(grid[lam].get(g, "—") for g in ("0.5", "1.0", "2.0")) + " |")
    if study.get("zcache"):
        parts += ["", "**Z-Cache against its base at the same setting** (reflection replays the non-block part over each"
                  " window; its wall-clock cost is in the speedup)", "", *STUDY_HEADER, *_study_rows(study["zcache"])]
    spread = study.get("seed_spread")
    if spread:
        a, b = spread["runs"]
        parts += ["", f"**Seed-to-seed spread of full computation** ({spread['samples']} samples each, seeds {a['seeds'][0]}-{a['seeds'][1]}"
                  f" vs {b['seeds'][0]}-{b['seeds'][1]}): class accuracy {100 * a['accuracy']:.1f}% vs {100 * b['accuracy']:.1f}%,"
                  f" FD-digits {a['fd_digits']:.0f} vs {b['fd_digits']:.0f} (spread {spread['fd_spread']:.0f})."]
    layers = study["layers"]
    parts += ["", f"**Fig. 5 pattern**: `{layers['policy']}`, calibrated, one generation of 10 samples; hit rate per block"
              f" {', '.join(f'{h:.0%}' for h in layers['hit_rate_per_block'])} ({', '.join(layers['blocks'])}).", "",
              "![AdaCorrection per block and step](docs/adacorrection_layers.png)", ""]
    return parts


GPU_RESULTS = Path(__file__).parent / "results" / "gpu"
GPU_COLUMNS = ["original + timestep read", "NoCache", "FORA(3)", "TaylorSeer(1,5)"]


def _gpu_section(files: list[Path]) -> list[str]:
    """The GPU runs of ``benchmarks/gpu_speed.py`` kept in ``benchmarks/results/gpu`` (this
    machine has no GPU, so they are recorded where they were measured, not regenerated)."""
    machines = set()
    rows = ["| run | model | tokens x batch | dtype | backend | original ms/step | "
            + " | ".join(GPU_COLUMNS) + " |", "|---|---|---|---|---|---|" + "---|" * len(GPU_COLUMNS)]
    for path in files:
        data = json.loads(path.read_text())
        m = data["machine"]
        machines.add(f"{m.get('gpu')}, CUDA {m.get('cuda')}, torch {m['versions']['torch']}")
        for run in data["runs"]:
            cells = []
            for name in GPU_COLUMNS:
                v = run["variants"].get(name)
                if v is None:
                    cells.append("")
                elif "flop_bound" in v and name != "NoCache":
                    cells.append(f"{v['speedup']:.2f}x ({v['flop_bound']:.2f}x)")
                else:
                    cells.append(f"{v['speedup']:.2f}x")
            rows.append(f"| {path.stem.split('_')[0]} | {run['model']} | {run.get('tokens', 256)} x {run.get('batch', 2)} |"
                        f" {run['dtype']} | {run['backend']} | {run['baseline_ms_per_step']:.2f} | " + " | ".join(cells) + " |")
    return ["## On a GPU: eager and torch.compile on an H100", "",
            "`python benchmarks/gpu_speed.py` on a lent GPU machine (" + "; ".join(sorted(machines)) + "), random-weight DiTs"
            " (DiT-S/2 and DiT-XL/2 sizes), 50 steps, inputs and timestep on the GPU as a pipeline feeds them; each cell the"
            " median of paired ratios against the original model (`torch.compile` of it for inductor), FLOP bound in brackets."
            " Run 1 found the `summary` bug and timed nothing; runs 2, 3 and 5 were on different machines, run 4 on run 3's;"
            " the eager rows of runs 2-3 are from before the eager graph called ATen's generated bindings, run 5's from after."
            " The JSON files are in `benchmarks/results/gpu/`; this"
            " machine has no GPU, so they are kept as measured rather than regenerated. `original + timestep read` is the"
            " original with the one host read of the timestep per call that the runtime makes; what the runs show and what"
            " they do not is in docs/findings.md (On a GPU).", "",
            *rows, ""]


def guard_section(g: dict) -> list[str]:
    """What the model guards cost, against one denoising step (benchmarks/guard_cost.py)."""
    m = g["machine"]
    parts = [
        "## What the guards cost",
        "",
        f"`python benchmarks/guard_cost.py --repeats {g['repeats']}` (batch 2, eager, CPU, {m['torch_threads']} threads, "
        f"torch {m['versions']['torch']}): one call of the compiled model with `NoCache`, the full model fingerprint a request"
        " start compares, and the program lookup every call makes (input signature, registration counter and watch list),"
        " interleaved; medians of per-round ratios. `+lora`: a rank-8 PEFT LoRA on every attention projection.",
        "",
        "| model | modules | step (ms) | request-start check (ms) | % of a step | per-call lookup (µs) | % of a step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in g["results"]:
        parts.append(f"| {r['model']} | {r['modules']} | {r['step_ms']:.1f} | {r['request_check_ms']:.2f} | "
                     f"{r['request_check_pct_of_step']:.2f}% | {r['call_lookup_us']:.1f} | {r['call_lookup_pct_of_step']:.3f}% |")
    parts += [
        "",
        "The per-call guard is one integer comparison and the watch list (a few entries, plus four per LoRA layer) inside a"
        " lookup that existed before the guards. The fingerprint runs"
        " once per request: spread over a 50-step request it is "
        + ", ".join(f"{r['request_check_pct_of_step'] / 50:.3f}% ({r['model']})" for r in g["results"])
        + " of each step here. It is Python work of fixed size, so on a GPU, where a step is tens of times shorter, its share"
        " grows by that factor (not measured here: this machine has no GPU).",
        "",
    ]
    return parts


def capture_modes_section(c: dict) -> list[str]:
    """capture='blocks' against whole-graph capture (benchmarks/capture_modes.py)."""
    m, rows = c["machine"], c["rows"]
    parts = [
        "## Capture modes: the fallback against whole-graph capture",
        "",
        f"`python benchmarks/capture_modes.py --steps {rows[0]['steps']} --repeats {rows[0]['repeats']}` (batch 2, eager, CPU,"
        f" {m['torch_threads']} threads, torch {m['versions']['torch']}): the uncompiled model and `{rows[0]['policy']}` compiled"
        " with `capture=\"graph\"` and with `capture=\"blocks\"` run the same loop (one request each), interleaved round by round;"
        " the speedups are medians of per-round ratios against the uncompiled loop of the same round, and \"blocks / graph\" is"
        " the median of the per-round quotient. \"First call\" is one fresh compile's first call (the capture; in blocks mode"
        " the recording call, each run's capture and its shape probe).",
        "",
        "| model | speedup, graph | speedup, blocks | blocks / graph | hit rate | first call, graph | first call, blocks |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        parts.append(f"| {r['model']} | {r['speedup']['graph']:.2f}x | {r['speedup']['blocks']:.2f}x | "
                     f"{r['blocks_share_of_graph_speedup']:.1%} | {r['hit_rate']['graph']:.0%} / {r['hit_rate']['blocks']:.0%} | "
                     f"{r['first_call_s']['graph']:.2f} s | {r['first_call_s']['blocks']:.2f} s |")
    parts += [
        "",
        "Goal (issue 14): blocks mode within 10% of whole-graph capture's speedup on DiT-S/2. Blocks mode runs the model's"
        " own code around the blocks (patch embedding, conditioning, final layer) eagerly, as the uncompiled model does, and"
        " its block stack as the same rewritten graph; what it gives up is the captured graph's own speed on that code, a"
        " small share of a step on these models. Both speedups exceed 2x at a 50% hit rate because the captured block graph"
        " itself runs faster than the module (see [Overhead with nothing skipped](#overhead-with-nothing-skipped)). Blocks"
        " mode's first call captures a smaller graph (only the blocks) but adds an eager recording call.",
        "",
    ]
    return parts


def ort_call_cost_section(c: dict) -> list[str]:
    """Where a cached ONNX Runtime call spends its time (benchmarks/ort_call_cost.py)."""
    m, rows = c["machine"], c["rows"]
    parts = [
        "## ONNX Runtime: what a cached call costs",
        "",
        f"`python benchmarks/ort_call_cost.py --repeats {rows[0]['repeats']} --inner {rows[0]['inner']}` (batch 2, CPU,"
        f" {m['torch_threads']} threads, onnxruntime {m['versions'].get('onnxruntime')}), `{rows[0]['policy']}`, variants"
        " interleaved round by round, medians. *Plain*: the plain ONNX export of the model (`session.run`). *Engine*: the two"
        " steps of a request through `adacache.load` (the first computes, the second reuses). *Reuse branch*: the cached"
        " graph run directly with its reuse flag on (`session.run`): what the graph itself costs when every block is skipped"
        " (the code around the blocks still runs). *Python*: the engine's own work per call (input checks, the step plan,"
        " binding the inputs).",
        "",
        "| model | plain (ms) | computing graph / plain | engine, computing (ms) | engine, reusing (ms) | reuse branch (ms) |"
        " engine Python (µs) | FORA(2) step / plain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = r["ms"]
        parts.append(f"| {r['model']} | {ms['plain']:.3f} | {r['compute_over_plain']:.2f}x | {ms['engine compute']:.3f} | "
                     f"{ms['engine reuse']:.3f} | "
                     f"{ms['reuse']:.3f} | {r['loader_python_us']:.0f} | {r['fora2_step_over_plain']:.2f}x |")
    parts += [
        "",
        "The computing call costs what the plain model costs: run the same way (`session.run`, \"computing graph / plain\")"
        " the cached graph's computing branch is within noise of the plain export, so the If around the blocks adds nothing"
        " measurable; through the engine it is often cheaper still (IOBinding keeps the cache state in ORT's buffers, where"
        " `session.run` copies every numpy feed). A reusing call costs the code around the blocks (patch embedding, conditioning, final layer: the reuse"
        " branch) plus the engine's Python, tens of microseconds. On sub-millisecond models that Python is a visible share"
        " of a reused step; it is fixed work per call, not per block. The machine is noisy: absolute times moved by up to 2x"
        " between runs, the per-round ratios much less.",
        "",
    ]
    return parts


def schedule_phase_section(c: dict) -> list[str]:
    """A bare loop against an explicit request, and where a fixed schedule's full steps fall
    (benchmarks/schedule_phase.py)."""
    m = c["machine"]
    steps = sorted({r["steps"] for r in c["phase"]}, reverse=True)
    first = c["bare_loop"]
    parts = [
        "## A user's own loop, and where the full steps fall",
        "",
        f"`python benchmarks/schedule_phase.py --samples {c['samples']} --steps {' '.join(map(str, steps))}` (reference model,"
        f" DDIM, CFG {c['guidance']:g} as one batched call per step, CPU, {m['torch_threads']} threads, {c['seconds']:.0f} s):"
        " PSNR against full computation of the same seeds. Equal computed steps cost the same, so these tables need no timing.",
        "",
        f"**Bare loop against explicit request** ({c['steps'][0]} steps): the compiled model called by a loop that announces"
        " nothing, and the same model inside an explicit request. The bare loop restarts its caches at its second call (the"
        " call before it may have been another request) and keeps the step count, so from its third call on it decides as"
        " the explicit request does (pattern: the first 12 steps, 1 = reused).",
        "",
        "| policy | bare loop | explicit request | bare − explicit | pattern, bare | pattern, explicit |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in first:
        b, e = r["bare"], r["explicit"]
        parts.append(f"| {r['policy']} | {b['psnr']:.2f} dB | {e['psnr']:.2f} dB | {b['psnr'] - e['psnr']:+.2f} dB | "
                     f"`{b['pattern'][:12]}` | `{e['pattern'][:12]}` |")
    parts += [
        "",
        "Where a fixed schedule decides (FORA, TaylorSeer and AdaCorrection over it) the bare loop's only difference is the"
        " restarted step, which computes: where the explicit request computes that step anyway (TaylorSeer's warm-up) the"
        " images agree to the last few hundredths of a dB, and where it would have reused it (FORA) the bare loop's extra"
        " full step gains a little. Gated methods (FirstBlockCache) compare each step with the cache they hold, which the restart changed,"
        " so their later decisions may differ.",
        "",
        "**Where the full steps fall**: each fixed-interval policy with its full steps counted from the first step"
        " (`anchor=\"start\"`, the default) and back from the last (`anchor=\"end\"`: the request always ends on a full"
        " computation; it needs the request's length). The computed steps and the hit rate over block runs are in brackets;"
        " rows where both anchors give the same schedule are left out. FORA's `warmup=0` rows are not of equal cost:"
        " anchored to the end, step 0 computes anyway (its caches are empty).",
        "",
        "| steps | policy | start | end | end − start |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in c["phase"]:
        if r["same_schedule"]:
            continue
        a, b = r["start"], r["end"]
        parts.append(f"| {r['steps']} | {r['policy']} | {a['psnr']:.2f} dB ({a['computed_steps']}, {a['hit_rate']:.0%}) | "
                     f"{b['psnr']:.2f} dB ({b['computed_steps']}, {b['hit_rate']:.0%}) | {b['psnr'] - a['psnr']:+.2f} dB |")
    parts += ["", "Verdict, over the rows of equal cost (same computed steps, hit rates within 1%):", "",
              "| method | rows | start better | end better | mean end − start |", "|---|---:|---:|---:|---:|"]
    for name, v in c["verdict"].items():
        parts.append(f"| {name} | {v['rows']} | {v['start_better']} | {v['end_better']} | {v['mean_end_minus_start_db']:+.2f} dB |")
    parts += [
        "",
        "The start anchor stays every policy's default. Anchored to the end, the window right after the warm-up is longer or"
        " shorter than the interval depending on the step count, and the early steps, where the latent changes most, are"
        " forecast from one full step (order 0) or reused longest; a full final step does not buy that back on this model."
        " Over AdaCorrection the verdict is mixed (its veto recomputes blocks where a forecast drifts, whichever the"
        " anchor), and its mean still favours the start. `anchor=\"end\"` stays as an option (FORA, TaylorSeer, and the"
        " wrappers over them through their base).",
        "",
    ]
    return parts


def forecasters_section(c: dict) -> list[str]:
    """TaylorSeer's powers against HiCache's scaled Hermite basis (benchmarks/forecasters.py)."""
    m, rows = c["machine"], c["rows"]
    sigmas = list(rows[0]["hicache"])
    parts = [
        "## Forecasting bases: TaylorSeer against HiCache",
        "",
        f"`python benchmarks/forecasters.py --samples {c['samples']} --steps {c['steps']}` (reference model, DDIM, CFG, CPU,"
        f" {m['torch_threads']} threads, {c['seconds']:.0f} s): every HiCache row runs its TaylorSeer row's schedule (the"
        " script checks the reuse patterns are equal), so cost is equal and only fidelity is compared: PSNR against full"
        " computation of the same seeds.",
        "",
        "| schedule | full steps | TaylorSeer | " + " | ".join(f"HiCache σ={s}" for s in sigmas) + " | best HiCache − TaylorSeer |",
        "|---|---:|---:|" + "---:|" * len(sigmas) + "---:|",
    ]
    for r in rows:
        base = r["taylor"]["psnr"]
        best = max(v["psnr"] for v in r["hicache"].values())
        parts.append(f"| {r['schedule']} | {r['taylor']['computed_steps']} | {base:.2f} dB | "
                     + " | ".join(f"{v['psnr']:.2f} dB" for v in r["hicache"].values()) + f" | {best - base:+.2f} dB |")
    parts += [
        "",
        "σ = 0.75 is HiCache's default here: it kept the most of the factors tried at every interval. It adds nothing"
        " measurable over TaylorSeer's second order on this model and a few tenths of a dB over its first order (whose slope"
        " it weights by 2σ² = 1.125); 0.5, the reference implementation's FLUX setting, damps the slope and loses 2.7-4.2 dB."
        " The Hermite basis is meant for the overshoot of long, high-order extrapolation; on this model TaylorSeer's second"
        " order does not overshoot at these intervals, so there is little for it to fix.",
        "",
    ]
    return parts


def main(out_dir: str, target: str) -> None:
    out = Path(out_dir)
    parts = ["# Benchmarks", "", "Every figure below was measured by `bash benchmarks/regenerate.sh` on the code at the commit that"
             " changed this file; ratios are medians over repeats, measured in one process with the baseline interleaved"
             " (in the bench and the study tables, the median of paired ratios: each run divided into the baseline run"
             " timed just before it, so that slow phases of the machine hit both sides of a ratio)."
             " The machine is shared and noisy (2 CPU cores); treat differences under about 10% as noise."
             " What the numbers say, including where adacache is not ahead, is summarised in [docs/findings.md](docs/findings.md).", ""]
    core = out / "core_speed.json"
    if core.exists():
        c = json.loads(core.read_text())
        parts += [
            "## Core compiler: DiT-S/2, eager, CPU",
            "",
            f"`python benchmarks/core_speed.py --config small --steps {c['steps']} --repeats {c['repeats']} --threads {c['threads']}` "
            f"(12 blocks, hidden 384, 6 heads, 32x32x4 latent, batch 2; torch {c['torch']}; {c['machine']}).",
            "",
            "| variant | s / 50-step generation | ms / step | speedup vs original |",
            "|---|---|---|---|",
        ]
        base = c["median_seconds"]["original"]
        for name, sec in c["median_seconds"].items():
            parts.append(f"| {name} | {sec:.2f} | {1e3 * sec / c['steps']:.1f} | {base / sec:.3f}x |")
        parts += [
            "",
            f"* NoCache (pass-through) overhead: **{c['nocache_overhead']:.3f}x** per step (goal ≤ 1.03x).",
            *( [f"* FORA(interval=1), caches kept and refreshed every step, nothing skipped: **{c['fora1_overhead']:.3f}x** per step."]
               if "fora1_overhead" in c else []),
            f"* FORA(interval=3): **{c['fora3_speedup']:.2f}x** faster (goal ≥ 2.6x); FLOP bound {c['fora3_flop_bound']:.2f}x, "
            f"achieved / bound {c['fora3_achieved_over_bound']:.2f}.",
            "",
        ]
    guard = out / "guard_cost.json"
    if guard.exists():
        parts += guard_section(json.loads(guard.read_text()))
    modes = out / "capture_modes.json"
    if modes.exists():
        parts += capture_modes_section(json.loads(modes.read_text()))
    phase = out / "schedule_phase.json"
    if phase.exists():
        parts += schedule_phase_section(json.loads(phase.read_text()))
    forecasters = out / "forecasters.json"
    if forecasters.exists():
        parts += forecasters_section(json.loads(forecasters.read_text()))
    ort_cost = out / "ort_call_cost.json"
    if ort_cost.exists():
        parts += ort_call_cost_section(json.loads(ort_cost.read_text()))
    backends = out / "backends_speed.json"
    if backends.exists():
        b = json.loads(backends.read_text())
        parts += ["## Backends: does the speedup survive compilation and export?", "",
                  f"`python benchmarks/backends_speed.py --steps {b['steps']}` with `{b['policy']}`, batch 2, CPU.", "",
                  "| model | eager speedup | eager, vs the captured graph with nothing cached | torch.compile speedup (cached+compiled vs compiled)"
                  " | ONNX Runtime speedup (cached export vs plain export) | ORT / eager ratio | ORT / eager-graph ratio |",
                  "|---|---|---|---|---|---|---|"]
        for model, r in b["models"].items():
            s = r["speedup"]
            graph = f"{s['eager graph']:.2f}x" if "eager graph" in s else "—"
            kept = f"{r['ort_over_eager_graph']:.2f}" if "ort_over_eager_graph" in r else "—"
            parts.append(f"| {model} | {s['eager']:.2f}x | {graph} | {s['inductor']:.2f}x | {s['ort']:.2f}x | {r['kept_under_ort']:.2f} | {kept} |")
        if "reference" in b["models"]:
            parts += ["", "On the reference model (1-3 ms per step in ONNX Runtime, run to run) eager's ratio includes the original"
                      " module's Python dispatch, which caching skips along with the blocks and which ONNX Runtime never pays;"
                      " the eager-graph column is the ratio without it. docs/findings.md has the analysis and re-runs."]
        parts += [""]
    study = out / "offset_study.json"
    if study.exists():
        st = json.loads(study.read_text())
        parts += ["## Does AdaCorrection's offset score predict the reuse error?", "",
                  f"`python benchmarks/offset_score_study.py --samples {st['samples']}` on the reference model (CFG {st['guidance']}, lags {st['lags']}):"
                  " Spearman correlation of each predictor (from the block input) with the true error of reusing the block's cache"
                  " (its residual, or for the rows marked so its output); 'calibrated' multiplies the temporal term by the per-block"
                  " scale `adacache.calibrate` fits on other seeds.", "",
                  "| predictor | across steps, lags, blocks | within a step, across blocks (median) |", "|---|---|---|"]
        for name, val in st["predictors"].items():
            parts.append(f"| {name} | {val['spearman_all']:+.2f} | {val['spearman_within_step_median']:+.2f} |")
        parts += ["", f"Reuse error at lag 1 in the last five steps is {st['err_last5_over_mid']:.1f}x its mid-trajectory level.", ""]
    goal = out / "goal_check.json"
    if goal.exists():
        parts += _goal_section(json.loads(goal.read_text()))
    ada = out / "adacorrection" / "study.json"
    if ada.exists():
        parts += _adacorrection_section(json.loads(ada.read_text()))
    span = out / "adacorrection" / "span.json"
    if span.exists():
        parts += _span_section(json.loads(span.read_text()))
    gpu_files = sorted(GPU_RESULTS.glob("*.json"))
    if gpu_files:
        parts += _gpu_section(gpu_files)
    bench = out / "bench" / "results.json"
    if bench.exists():
        r = json.loads(bench.read_text())
        quality, speed, overhead = _rows(r["quality"]), _rows(r["speed"]), _rows(r.get("overhead", []))
        if r["machine"].get("relabelled"):
            parts_note = f"Note: {r['machine']['relabelled']}."
        else:
            parts_note = ""
        if (out / "overhead.json").exists():  # a separate overhead run adds models (or replaces the bench's rows for them)
            extra = _rows(json.loads((out / "overhead.json").read_text()))
            models = {r.note for r in extra}
            overhead = [r for r in overhead if r.note not in models] + extra
        settings = r["machine"].get("settings", {})
        parts += ["## Reference model: fidelity and speed, adacache and the systems in use today", "",
                  f"`adacache bench --anchors --samples {settings.get('samples')} --guidance {' '.join(map(str, settings.get('guidance', [])))}"
                  f" --repeats {settings.get('repeats')}` — {settings.get('samples')} samples (seeds x classes), DDIM {settings.get('steps')} steps;"
                  " PSNR / SSIM / feature distance against full computation of the same seeds; class accuracy and FD-digits"
                  " from the shipped digit classifier (no LPIPS / Inception weights can be downloaded here, so its features stand in).",
                  f" Versions: {r['machine']['versions']}; {r['machine']['processor']}, {r['machine']['torch_threads']} torch threads;"
                  f" run took {r['machine'].get('elapsed_s')} s. {parts_note}", "",
                  report.quality_table(quality), "", "### At matched speedups", report.matched_table(quality), "",
                  "![Pareto plot](docs/pareto.png)", ""]
        if speed:
            parts += ["### Speed track (random weights)", report.speed_table(speed), ""]
        if overhead:
            parts += ["### Overhead with nothing skipped", report.overhead_table(overhead), ""]
        Path("docs").mkdir(exist_ok=True)
        report.pareto_plot(quality, "docs/pareto.png")
    Path(target).write_text("\n".join(parts) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
