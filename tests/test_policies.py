"""Policy validation and the math of the inserted ops, against direct reference code."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adacache
from adacache import ops
from adacache.policies.fora import is_fora_reuse_step
from adacache.stepping import allow_reuse


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: adacache.FORA(interval=0), "interval"),
        (lambda: adacache.FORA(interval=-2), "interval"),
        (lambda: adacache.FORA(warmup=-1), "warmup"),
        (lambda: adacache.FORA(interval=2.5), "interval"),
        (lambda: adacache.FORA(granularity="layer"), "granularity"),
        (lambda: adacache.FORA(granularity="module", reuse="residual"), "no residual form"),
        (lambda: adacache.FirstBlockCache(threshold=0), "threshold"),
        (lambda: adacache.FirstBlockCache(threshold=11), "threshold"),
        (lambda: adacache.FirstBlockCache(threshold=0.1, probe_blocks=0), "probe_blocks"),
        (lambda: adacache.FirstBlockCache(threshold=0.1, tail_blocks=-1), "tail_blocks"),
        (lambda: adacache.FORA(intervall=3), "no parameter"),
        (lambda: adacache.FORA(anchor="middle"), "anchor must be 'start'"),
        (lambda: adacache.TaylorSeer(anchor=None), "anchor must be 'start'"),
        (lambda: adacache.FirstBlockCache(treshold=0.1), "valid parameters"),
    ],
)
def test_invalid_parameters_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_policies_are_frozen_and_describe_themselves():
    policy = adacache.FORA(interval=4, warmup=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.interval = 5  # type: ignore[misc]
    assert policy.describe() == "FORA(interval=4, warmup=2, granularity='block', reuse=None, anchor='start')"
    assert policy.to_dict()["policy"] == "FORA"


@given(interval=st.integers(1, 9), warmup=st.integers(0, 5), steps=st.integers(1, 60))
def test_fora_schedule_computes_once_per_interval(interval, warmup, steps):
    reuse = [is_fora_reuse_step(s, interval, warmup) for s in range(steps)]
    assert not any(reuse[:warmup]), "warm-up steps always compute"
    computed_after = [s for s in range(warmup, steps) if not reuse[s]]
    assert computed_after == list(range(warmup, steps, interval))


@given(interval=st.integers(1, 9), warmup=st.integers(0, 5), total=st.integers(1, 60))
def test_an_end_anchored_schedule_counts_back_from_the_last_step(interval, warmup, total):
    schedule = {"kind": "interval", "interval": interval, "warmup": warmup, "anchor": "end"}
    computed = [s for s in range(total) if not allow_reuse(schedule, s, total)]
    assert computed == sorted(set(range(min(warmup, total))) | set(range(total - 1, warmup - 1, -interval)))
    assert total - 1 in computed, "the last step always computes"
    start = dict(schedule, anchor="start")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unknown_length = [allow_reuse(schedule, s) for s in range(total)]
    # ... and says so at every step past the warm-up (Python's filters show it once per place).
    assert len([w for w in caught if issubclass(w.category, adacache.RequestBoundaryWarning)]) == max(0, total - warmup)
    assert unknown_length == [allow_reuse(start, s) for s in range(total)], "of unknown length, the schedule counts from the start"
    # Equal cost: past the warm-up both anchors compute ceil((total - warmup) / interval) steps.
    assert sum(not allow_reuse(start, s, total) for s in range(total)) == len(computed)


@settings(max_examples=50, deadline=None)
@given(
    batch=st.integers(1, 4),
    tokens=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
)
def test_offset_score_matches_direct_formula(batch, tokens, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    cached = torch.randn(batch, tokens, 5, generator=gen, dtype=torch.float64) * scale
    fresh = cached + torch.randn(batch, tokens, 5, generator=gen, dtype=torch.float64) * scale * 0.1
    got = ops.offset_score(fresh, cached)
    for b in range(batch):
        expected = sum(abs(fresh[b] - cached[b]).flatten().tolist()) / sum(abs(cached[b]).flatten().tolist())
        assert got[b].item() == pytest.approx(expected, rel=1e-5)
    # The score is scale-free: the same relative change gives the same score.
    assert torch.allclose(ops.offset_score(fresh * 7, cached * 7), got, rtol=1e-5)


def test_below_requires_every_item_and_finite_scores():
    assert bool(ops.below(torch.tensor([0.01, 0.02]), 0.05))
    assert not bool(ops.below(torch.tensor([0.01, 0.2]), 0.05)), "one stale item blocks the batch"
    assert not bool(ops.below(torch.tensor([0.01, float("nan")]), 0.05))


def test_cache_load_inverts_residual_of():
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.allclose(ops.cache_load(x, ops.residual_of(y, x)), y)
    assert not bool(ops.all_finite(torch.tensor([1.0, float("inf")])))
    assert bool(ops.all_finite(torch.ones(3), torch.zeros(2)))


# -- what a policy can do is declared by the policy (issue 29, stage 3) --------------------

def test_capabilities_are_declared_by_each_policy():
    assert [p.calibratable for p in (adacache.TeaCache(0.1), adacache.AdaCorrection(base=adacache.FORA(interval=3)))] == [True, True]
    assert not any(p.calibratable for p in (adacache.NoCache(), adacache.FORA(), adacache.FirstBlockCache(0.08),
                                            adacache.TaylorSeer(), adacache.ZCache()))
    assert {type(p).__name__ for p in (adacache.TaylorSeer(), adacache.TeaCache(0.1), adacache.FORA(),
                                       adacache.FirstBlockCache(0.08)) if p.zcache_base} == {"TaylorSeer", "TeaCache"}
    assert not adacache.FORA(interval=1).proposes_reuse and adacache.FORA(interval=2).proposes_reuse
    assert adacache.ZCache().owns_trajectory and not adacache.TaylorSeer().owns_trajectory
    with pytest.raises(adacache.PolicyError, match="FORA has nothing to calibrate"):
        adacache.FORA().calibrate(None, None)


def test_calibration_the_bench_and_zcache_list_no_policy_classes():
    """They ask a policy what it can do (calibratable, zcache_base, proposes_reuse,
    owns_trajectory) instead of testing its class: a new method needs no line in them."""
    import ast
    from pathlib import Path

    import adacache.policies

    root = Path(adacache.__file__).parent
    names = set(adacache.policies.__all__) - {"Policy", "SitePlan", "StepContext", "policy_dataclass"}
    files = [root / "calibration.py", root / "policies" / "zcache.py", root / "runtime" / "sampling.py",
             *sorted((root / "bench").rglob("*.py"))]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                for cls in classes:
                    name = getattr(cls, "id", None) or getattr(cls, "attr", None)
                    if name in names:
                        found.append(f"{path.name}:{node.lineno} isinstance(..., {name})")
    assert found == []
