"""EasyCache: the gate and rate against their formulas, a hand-written loop, ONNX."""

from __future__ import annotations

import math

import pytest
import torch

import adacache
from adacache import ops
from families import FAMILIES
from helpers import assert_onnx_matches_eager, moving, run_against_reference
from test_runtime import TIMESTEPS, _embed, _final


def test_drift_and_rate_follow_equations_31_and_33():
    x_prev, x = torch.zeros(2, 3, 4), torch.full((2, 3, 4), 0.5)  # |x - x_prev| = 0.5 * sqrt(24)
    v_prev, v = torch.ones(2, 3, 4), torch.full((2, 3, 4), 2.0)  # |v_prev| = sqrt(24), |v - v_prev| = sqrt(24)
    passes, total = ops.transformation_drift([x], [x_prev], [v_prev], torch.tensor(0.3), torch.tensor(0.01), 0.2)
    assert total.item() == pytest.approx(0.01 + 0.3 * 0.5)  # accumulated + k |dx| / |v_prev|
    assert bool(passes) and not bool(ops.transformation_drift([x], [x_prev], [v_prev], torch.tensor(0.4), torch.tensor(0.01), 0.2)[0])
    assert ops.transformation_rate([v], [v_prev], [x], [x_prev], torch.tensor(True)).item() == pytest.approx(2.0)
    # Two streams count as one vector: |(a, b)| = sqrt(|a|^2 + |b|^2).
    rate = ops.transformation_rate([v, v], [v_prev, v_prev], [x, 2 * x], [x_prev, x_prev], torch.tensor(True))
    assert rate.item() == pytest.approx(math.sqrt(2 * 24) / math.sqrt(0.25 * 24 + 24))
    # Unknown or undefined rates are infinite, and an infinite rate never passes.
    assert math.isinf(ops.transformation_rate([v], [v_prev], [x], [x_prev], torch.tensor(False)).item())
    assert math.isinf(ops.transformation_rate([v], [v_prev], [x], [x], torch.tensor(True)).item())
    still = x * (1 + 1e-7)  # an input that moved by rounding only: no rate
    assert math.isinf(ops.transformation_rate([v], [v_prev], [still], [x], torch.tensor(True)).item())
    assert not bool(ops.transformation_drift([x], [x], [v_prev], torch.tensor(float("inf")), torch.tensor(0.0), 1.0)[0])


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.float()))


def reference_easycache(model, inputs, threshold, warmup):
    """EasyCache written out on the built-in DiT, with the graph's state as it starts: zero
    caches, an invalid cache, a zero rate."""
    prev_x = prev_v = residual = None
    rate, acc, valid = 0.0, 0.0, False
    outs, reused = [], []
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            x, c = _embed(model, inputs(t))
            if prev_x is None:
                prev_x, prev_v = torch.zeros_like(x), torch.zeros_like(x)
            total = acc + rate * _norm(x - prev_x) / max(_norm(prev_v), 1e-12)
            use = step >= warmup and valid and math.isfinite(total) and total < threshold
            if use:
                v = x + residual
            else:
                v = x
                for block in model.blocks:
                    v = block(v, c)
                moved = _norm(x - prev_x)
                fresh = _norm(v - prev_v) / moved if moved > 1e-5 * _norm(x) else math.inf
                rate = fresh if valid and math.isfinite(fresh) else math.inf
                residual, valid = v - x, True
            acc = total if use else 0.0
            prev_x, prev_v = x, v
            reused.append(use)
            outs.append(_final(model, v, c))
    return outs, reused


@pytest.mark.parametrize("threshold", [0.3, 1.0])
def test_easycache_matches_hand_written_loop(threshold):
    model, inputs, n_blocks = FAMILIES["tiny_dit"]()
    inputs = moving(inputs)
    expected, reused = reference_easycache(model, inputs, threshold, warmup=2)
    cached = adacache.compile(model, adacache.EasyCache(threshold), example_inputs=((), inputs(TIMESTEPS[0])))
    counts = run_against_reference(cached, inputs, TIMESTEPS, expected)
    assert [r["reused"]["site_0"] for r in adacache.summary(cached).per_step] == reused
    assert counts == [0 if r else n_blocks for r in reused], "a reused step runs no block"
    assert reused[:2] == [False, False], "the warm-up (its second step measures the first rate)"
    if threshold == 1.0:
        assert sum(reused) >= 2


def test_easycache_parameters_are_checked():
    with pytest.raises(ValueError, match="threshold"):
        adacache.EasyCache(threshold=0)
    with pytest.raises(ValueError, match="warmup"):
        adacache.EasyCache(warmup=-1)
    assert adacache.EasyCache(0.1, warmup=3).describe() == "EasyCache(threshold=0.1, warmup=3)"


def test_easycache_exports_to_onnx(tmp_path):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, adacache.EasyCache(1.0))
    engine = assert_onnx_matches_eager(cached, moving(inputs), TIMESTEPS, tmp_path / "easy")
    assert engine.reused["site_0"] == adacache.summary(cached).sites[0].reused >= 2
