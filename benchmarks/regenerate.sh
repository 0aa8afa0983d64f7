#!/usr/bin/env bash
# Regenerate every figure in BENCHMARKS.md on this machine (about 70 minutes on 2 CPU cores).
# Usage: bash benchmarks/regenerate.sh [THREADS]
# Not run here: benchmarks/gpu_speed.py needs a CUDA GPU; its JSON files are kept in
# benchmarks/results/gpu and assembled as measured.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${1:-2}"
OUT=bench-out
mkdir -p "$OUT"
adacache bench --anchors --samples 50 --guidance 4.0 --repeats 3 --threads "$THREADS" --speed-models dit-s --overhead-models --out "$OUT/bench"
python benchmarks/goal_check.py --samples 50 --repeats 7 --threads "$THREADS" --out "$OUT/goal_check.json"
python benchmarks/adacorrection_study.py --samples 20 --repeats 3 --threads "$THREADS" --out "$OUT/adacorrection"
python benchmarks/core_speed.py --config small --steps 50 --repeats 5 --threads "$THREADS" --out "$OUT/core_speed.json"
python benchmarks/guard_cost.py --repeats 15 --threads "$THREADS" --out "$OUT/guard_cost.json"
python benchmarks/capture_modes.py --steps 10 --repeats 15 --threads "$THREADS" --out "$OUT/capture_modes.json"
python benchmarks/schedule_phase.py --samples 20 --steps 50 30 20 --threads "$THREADS" --out "$OUT/schedule_phase.json"
(cd benchmarks && python forecasters.py --samples 20 --steps 50 --threads "$THREADS" --out "../$OUT/forecasters.json")
python benchmarks/ort_call_cost.py --repeats 9 --inner 10 --threads "$THREADS" --out "$OUT/ort_call_cost.json"
python benchmarks/backends_speed.py --models reference dit-s --steps 50 --repeats 3 --threads "$THREADS" --out "$OUT/backends_speed.json"
python benchmarks/offset_score_study.py --samples 20 --out "$OUT/offset_study.json"
python benchmarks/overhead.py --models diffusers-dit-s --steps 20 --repeats 3 --threads "$THREADS" --out "$OUT/overhead.json"
python benchmarks/assemble.py "$OUT" BENCHMARKS.md
