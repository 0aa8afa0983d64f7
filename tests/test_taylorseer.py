"""TaylorSeer: the schedule math against a direct formula, and the policy against a hand loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import adacache
from adacache.stepping import allow_reuse, forecast_controls
from families import FAMILIES
from helpers import assert_onnx_matches_eager, denoise
from test_runtime import TIMESTEPS, _embed, _final


@given(order=st.integers(0, 3), interval=st.integers(1, 6), warmup=st.integers(0, 3), step=st.integers(0, 40))
def test_forecast_coefficients_follow_the_taylor_formula(order, interval, warmup, step):
    schedule = {"kind": "interval", "interval": interval, "warmup": warmup}
    coef, update = forecast_controls(schedule, step, order)
    full = [s for s in range(step) if not allow_reuse(schedule, s)]
    assert coef[0] == 1.0 and update[0] == 1.0
    if allow_reuse(schedule, step):
        k = step - full[-1]
        for i in range(1, order + 1):
            expected = k**i / math.factorial(i) if i < len(full) else 0.0
            assert coef[i] == pytest.approx(expected)
        assert update[1:] == [0.0] * order
    else:
        for i in range(1, order + 1):
            expected = 1.0 / (step - full[-1]) if full and i <= len(full) else 0.0
            assert update[i] == pytest.approx(expected)


def reference_taylorseer(model, inputs, interval, order, warmup):
    """Block-residual TaylorSeer by hand: finite differences at full steps, forecast between."""
    derivs: dict[int, list[torch.Tensor]] = {}
    full_steps: list[int] = []
    outs = []
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            h, c = _embed(model, inputs(t))
            reuse = step >= warmup and (step - warmup) % interval != 0 and full_steps
            for i, block in enumerate(model.blocks):
                if reuse:
                    k = step - full_steps[-1]
                    d = derivs[i]
                    forecast = sum(d[j] * k**j / math.factorial(j) for j in range(min(order, len(full_steps) - 1) + 1))
                    h = h + forecast
                else:
                    out = block(h, c)
                    r = out - h
                    old = derivs.get(i)
                    new = [r]
                    for j in range(1, order + 1):
                        if old is not None and j <= len(full_steps):
                            new.append((new[j - 1] - old[j - 1]) / (step - full_steps[-1]))
                        else:
                            new.append(torch.zeros_like(r))
                    derivs[i] = new
                    h = out
            if not reuse:
                full_steps.append(step)
            outs.append(_final(model, h, c))
    return outs


@pytest.mark.parametrize("order", [0, 1, 2])
def test_taylorseer_matches_hand_written_loop(order):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    expected = reference_taylorseer(model, inputs, interval=3, order=order, warmup=1)
    cached = adacache.compile(model, adacache.TaylorSeer(order=order, interval=3, warmup=1, granularity="block"))
    got = denoise(cached, inputs)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert torch.allclose(a, b, atol=1e-5), f"step {step}"
    assert adacache.summary(cached).hit_rate == pytest.approx(4 / 8)


def test_order_zero_is_fora_and_memory_grows_with_order():
    model, inputs, _ = FAMILIES["tiny_dit"]()
    fora = denoise(adacache.compile(model, adacache.FORA(interval=3, granularity="module")), inputs)
    taylor0 = adacache.compile(model, adacache.TaylorSeer(order=0, interval=3, warmup=0, granularity="module"))
    assert all(torch.equal(a, b) for a, b in zip(fora, denoise(taylor0, inputs)))
    taylor2 = adacache.compile(model, adacache.TaylorSeer(order=2, interval=3, granularity="module"))
    denoise(taylor2, inputs)
    assert adacache.summary(taylor2).cache_bytes > 2.9 * adacache.summary(taylor0).cache_bytes


def test_taylorseer_exports_to_onnx_with_the_same_forecasts(tmp_path):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, adacache.TaylorSeer(order=1, interval=3))
    assert_onnx_matches_eager(cached, inputs, TIMESTEPS, tmp_path / "ts")
