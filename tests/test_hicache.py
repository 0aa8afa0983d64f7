"""HiCache: the scaled Hermite basis against direct formulas, the policy against a hand loop,
and its export (the basis travels to the engine as a table)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import adacache
from adacache.policies.hicache import hermite, hermite_coefficients
from families import FAMILIES
from helpers import assert_onnx_matches_eager, denoise
from test_runtime import TIMESTEPS
from test_taylorseer import reference_taylorseer


@given(x=st.floats(-3, 3))
def test_hermite_polynomials_match_their_closed_forms(x):
    closed = [1.0, 2 * x, 4 * x**2 - 2, 8 * x**3 - 12 * x, 16 * x**4 - 48 * x**2 + 12]
    for n, expected in enumerate(closed):
        assert hermite(n, x) == pytest.approx(expected, abs=1e-9)


def test_the_weights_are_the_survey_equation_47():
    sigma, lag = 0.5, 3
    assert hermite_coefficients(lag, 2, sigma) == pytest.approx([1.0, sigma * 2 * sigma * lag, sigma**2 * (4 * (sigma * lag) ** 2 - 2) / 2])
    # sigma = 1/sqrt(2): the first-order weight is TaylorSeer's k.
    assert hermite_coefficients(lag, 1, 1 / math.sqrt(2)) == pytest.approx([1.0, lag])
    policy = adacache.HiCache(order=2, interval=4, sigma=0.5)
    assert policy.forecast_basis() == [hermite_coefficients(k, 2, 0.5) for k in range(5)]
    assert adacache.AdaCorrection(base=policy).forecast_basis() == policy.forecast_basis()


def test_invalid_sigma_is_refused():
    with pytest.raises(adacache.PolicyError, match="HiCache: sigma"):
        adacache.HiCache(sigma=0)
    with pytest.raises(adacache.PolicyError, match="HiCache: order"):
        adacache.HiCache(order=7)


@pytest.mark.parametrize("order, sigma", [(1, 0.5), (2, 0.5), (2, 0.75)])
def test_hicache_matches_a_hand_written_loop(order, sigma):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    expected = reference_taylorseer(model, inputs, interval=3, order=order, warmup=1,
                                    weight=lambda k, j: hermite_coefficients(k, j, sigma)[j])
    cached = adacache.compile(model, adacache.HiCache(order=order, interval=3, warmup=1, sigma=sigma))
    got = denoise(cached, inputs)
    assert any(any(r["reused"].values()) for r in adacache.summary(cached).per_step)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert torch.allclose(a, b, atol=1e-5), f"step {step}: {float((a - b).abs().max())}"


def test_at_sigma_one_over_root_two_first_order_is_taylorseer():
    model, inputs, _ = FAMILIES["tiny_dit"]()
    hicache = denoise(adacache.compile(model, adacache.HiCache(order=1, interval=3, sigma=1 / math.sqrt(2))), inputs)
    taylor = denoise(adacache.compile(model, adacache.TaylorSeer(order=1, interval=3)), inputs)
    for a, b in zip(hicache, taylor):
        assert torch.allclose(a, b, atol=1e-5)


def test_hicache_exports_with_its_basis(tmp_path):
    pytest.importorskip("onnxruntime")
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, adacache.HiCache(order=2, interval=3, sigma=0.5))
    engine = assert_onnx_matches_eager(cached, inputs, TIMESTEPS, tmp_path / "hi")
    basis = engine.manifest["forecast"]["basis"]
    assert len(basis) == 4 and all(row == pytest.approx(want) for row, want in zip(basis, cached.adacache.policy.forecast_basis()))
