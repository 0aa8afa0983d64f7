"""adacache bench: the command runs end to end, and the tables pick the right rows."""

from __future__ import annotations

import json

from adacache.bench.report import matched_table, quality_table
from adacache.bench.runner import Row
from adacache.cli import main


def test_bench_quick_writes_tables_json_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--samples", "4", "--steps", "6", "--repeats", "1", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in results["quality"]]
    assert names[0] == "full computation"
    assert "FORA(interval=3)" in names and "FirstBlockCache(0.08)" in names
    fora = next(r for r in results["quality"] if r["name"].startswith("FORA"))
    assert fora["speedup"] > 0 and 0 < fora["hit_rate"] < 1 and fora["psnr"] > 0
    assert fora["accuracy"] is not None and fora["fd_digits"] is not None
    assert (out / "pareto.png").stat().st_size > 1000
    assert "| full computation |" in (out / "results.md").read_text()
    assert "FORA(interval=3" in capsys.readouterr().out
    assert results["machine"]["versions"]["torch"]


def test_matched_table_takes_best_psnr_at_or_above_each_speedup():
    rows = [
        Row("a1", "fam A", 4.0, speedup=1.6, psnr=35.0),
        Row("a2", "fam A", 4.0, speedup=2.2, psnr=31.0),
        Row("a3", "fam A", 4.0, speedup=2.1, psnr=33.0),
        Row("b1", "fam B", 4.0, speedup=1.4, psnr=40.0),
    ]
    table = matched_table(rows, targets=(1.5, 2.0, 3.0))
    line_a = next(line for line in table.splitlines() if line.startswith("| fam A"))
    assert "35.0 (a1, 1.60x)" in line_a and "33.0 (a3, 2.10x)" in line_a and line_a.endswith("— |")
    line_b = next(line for line in table.splitlines() if line.startswith("| fam B"))
    assert line_b.count("—") == 3
    assert "| a2 | 2.20x | 31.00 |" in quality_table(rows)


def test_bench_policy_expressions_mark_what_to_calibrate():
    import pytest

    import adacache
    from adacache.bench.cli import parse_bench_policy
    from adacache.bench.runner import _family
    from adacache.bench.tracks import Calibrated

    wrapped = parse_bench_policy("calibrated(AdaCorrection(base=FORA(interval=3), veto=0.2))")
    assert isinstance(wrapped, Calibrated) and wrapped.policy == adacache.AdaCorrection(base=adacache.FORA(interval=3), veto=0.2)
    assert parse_bench_policy("TeaCache(0.1)") == adacache.TeaCache(0.1)
    assert _family(adacache.TeaCache(0.1, coefficients=(2.0, 0.0))) == "adacache TeaCache (calibrated)"
    assert _family(adacache.TeaCache(0.1)) == "adacache TeaCache"
    span = adacache.AdaCorrection(base=adacache.TaylorSeer(order=1, interval=5), veto=0.2, unit="span")
    assert _family(span) == "adacache AdaCorrection+TaylorSeer (span)", "one decision per step is a curve of its own"
    with pytest.raises(adacache.PolicyError):
        parse_bench_policy("calibrated(Nope())")


def test_speedup_is_the_median_of_paired_ratios_so_drift_cancels(monkeypatch):
    """A machine that slows 5x halfway through: each variant run is divided into the baseline
    run just before it, so a variant costing half the baseline reads 2x whenever it ran; a
    ratio of medians would read whatever phase the two medians happened to fall in."""
    from adacache.bench import runner

    clock = {"now": 0.0, "runs": 0}
    monkeypatch.setattr(runner.time, "perf_counter", lambda: clock["now"])

    def run(cost: float) -> None:
        clock["runs"] += 1
        clock["now"] += cost * (5.0 if clock["runs"] > 6 else 1.0)

    variants = [runner.Variant("half", "x", 0.5), runner.Variant("same", "x", 1.0), runner.Variant("broken", "x", 0.1, error="no")]
    timings = runner.time_interleaved(run, variants, runner.Variant("original", "full", 1.0), repeats=3)
    assert timings.speedup == {"half": 2.0, "same": 1.0}
    assert "broken" not in timings.seconds
    assert timings.seconds["half"] != 0.5, "the drift is real: raw seconds show it"


def test_goal_check_verdict_and_its_section():
    """The >=5x at >=30 dB verdict: every part must hold; FD-digits may not exceed full
    computation's by more than the spread (lower is closer to real digits)."""
    import sys
    from pathlib import Path

    bench_dir = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench_dir)
    try:
        import assemble
        import goal_check
    finally:
        sys.path.remove(bench_dir)
    full = {"accuracy": 1.0, "fd_digits": 1085.0}
    spread = {"accuracy_spread": 0.0, "fd_spread": 13.0}
    row = {"name": "TaylorSeer(order=2, interval=7)", "speedup": 5.4, "psnr": 31.2, "accuracy": 1.0, "fd_digits": 1066.0, "flop_bound": 6.17}
    assert goal_check.verdict(row, full, spread)["met"]
    assert goal_check.verdict({**row, "fd_digits": 1099.0}, full, spread) == {
        "speedup": True, "psnr": True, "accuracy": True, "fd_digits": False, "met": False}
    assert not goal_check.verdict({**row, "speedup": 4.99}, full, spread)["met"]
    assert not goal_check.verdict({**row, "psnr": 29.9}, full, spread)["met"]
    assert not goal_check.verdict({**row, "accuracy": 0.98}, full, spread)["met"]
    goal = {"machine": {"settings": {"samples": 50, "timing_samples": 20, "repeats": 7, "steps": 50, "guidance": 4.0}},
            "full": full, "seed_spread": spread,
            "candidates": [{**row, "goal": goal_check.verdict(row, full, spread)},
                           {**row, "name": "FORA(interval=8)", "fd_digits": 1230.0, "goal": goal_check.verdict({**row, "fd_digits": 1230.0}, full, spread)}]}
    text = "\n".join(assemble._goal_section(goal))
    assert "| TaylorSeer(order=2, interval=7) | 5.40x | 6.17x | 31.20 | 100.0% | 1066 | met |" in text
    assert "| FORA(interval=8) |" in text and "not met: fd_digits" in text
