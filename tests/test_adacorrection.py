"""AdaCorrection: the offset math against direct formulas, and the policy against a hand loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adacache
from adacache import ops
from families import FAMILIES
from helpers import run_against_reference, assert_onnx_matches_eager, denoise
from test_runtime import TIMESTEPS, _embed, _final


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(1, 5), dim=st.integers(2, 6), seed=st.integers(0, 2**16), scale=st.floats(1e-2, 1e2))
def test_offset_terms_match_equations_1_and_2(batch, tokens, dim, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    cached = torch.randn(batch, tokens, dim, generator=gen, dtype=torch.float64) * scale
    x = cached + torch.randn(batch, tokens, dim, generator=gen, dtype=torch.float64) * scale * 0.3
    temporal, spatial = ops.adacorrection_terms(x, cached)
    for b in range(batch):
        norm = np.mean([np.linalg.norm(cached[b, i].numpy()) for i in range(tokens)])
        eq1 = np.mean([np.linalg.norm((x[b, i] - cached[b, i]).numpy()) for i in range(tokens)])
        eq2 = np.mean([np.std(x[b, i].numpy()) for i in range(tokens)])
        assert temporal[b].item() == pytest.approx(eq1 / norm, rel=1e-4)
        assert spatial[b].item() == pytest.approx(eq2 / norm, rel=1e-4)
    score = ops.adacorrection_score(x, cached, 0.5)
    assert torch.allclose(score, temporal + 0.5 * spatial)
    # Scale-free: the same relative change scores the same at any magnitude.
    assert torch.allclose(ops.adacorrection_score(x * 10, cached * 10, 0.5), score, rtol=1e-4)


@given(scores=st.lists(st.floats(0, 5), min_size=1, max_size=4), gamma=st.floats(0.1, 4))
def test_correction_weight_is_clipped_worst_item(scores, gamma):
    w = ops.correction_weight(torch.tensor(scores, dtype=torch.float64), gamma).item()
    assert w == pytest.approx(min(1.0, max(0.0, gamma * max(scores))))
    assert ops.correction_weight(torch.tensor([0.1, float("nan")]), 1.0).item() == 1.0, "NaN scores refresh"


def test_decision_table():
    t, f = torch.tensor(True), torch.tensor(False)
    w = lambda v: torch.tensor(v)  # noqa: E731
    assert bool(ops.offset_decision(t, t, w(0.2), 0.0, 0.5)), "base proposes, offset small: reuse"
    assert not bool(ops.offset_decision(t, t, w(0.6), 0.0, 0.5)), "veto"
    assert bool(ops.offset_decision(f, t, w(0.05), 0.1, 0.5)), "accept against the base"
    assert not bool(ops.offset_decision(t, f, w(0.0), 0.1, 0.5)), "never without a valid cache"
    assert torch.allclose(ops.correct(w(0.25), torch.zeros(3), torch.ones(3)), torch.full((3,), 0.25))


def reference_adacorrection_fora(model, inputs, interval, gamma, accept, veto, band):
    """AdaCorrection over FORA by hand, block residual form, temporal score."""
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    outs, reused = [], []
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            h, c = _embed(model, inputs(t))
            base = step % interval != 0
            flags = []
            for i, block in enumerate(model.blocks):
                use = False
                w = 1.0
                if i in cache:
                    residual, x_c = cache[i]
                    temporal, _ = ops.adacorrection_terms(h, x_c)
                    w = min(1.0, gamma * temporal.max().item())
                    use = (base and w < veto) or w < accept
                flags.append(use)
                if use:
                    h = h + cache[i][0]
                else:
                    out = block(h, c)
                    new = (out - h, h.clone())
                    if band and i in cache:
                        out = (1 - w) * (h + cache[i][0]) + w * out
                    cache[i] = new
                    h = out
            reused.append(flags)
            outs.append(_final(model, h, c))
    return outs, reused


@pytest.mark.parametrize("accept, veto, band", [(0.0, 0.3, False), (0.15, 0.6, False), (0.0, 0.5, True)])
def test_adacorrection_matches_hand_written_loop(accept, veto, band):
    model, inputs, n_blocks = FAMILIES["tiny_dit"]()
    expected, reused = reference_adacorrection_fora(model, inputs, 3, 1.0, accept, veto, band)
    policy = adacache.AdaCorrection(base=adacache.FORA(interval=3, reuse="residual"), accept=accept, veto=veto, band=band)
    cached = adacache.compile(model, policy, example_inputs=((), inputs(TIMESTEPS[0])))
    executed = run_against_reference(cached, inputs, TIMESTEPS, expected)
    got = [[rec["reused"][f"site_{i}"] for i in range(n_blocks)] for rec in adacache.summary(cached).per_step]
    assert got == reused
    assert executed == [n_blocks - sum(flags) for flags in reused], "a reused block does not run"


def test_adacorrection_splits_a_first_block_cache_span_per_block():
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, adacache.AdaCorrection(base=adacache.FirstBlockCache(1.0)))
    denoise(cached, inputs)
    sites = cached.programs[0].layout.sites
    assert [(s.label, s.role, s.gated_by) for s in sites] == [
        ("blocks.0", "probe", None), ("blocks.1", "cached", "site_0"), ("blocks.2", "cached", "site_0"), ("blocks.3", "cached", "site_0"),
    ]
    with pytest.raises(ValueError, match="accept"):
        adacache.AdaCorrection(accept=0.6, veto=0.5)
    with pytest.raises(ValueError, match="base"):
        adacache.AdaCorrection(base="FORA")


def test_adacorrection_exports_to_onnx(tmp_path):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, adacache.AdaCorrection(base=adacache.FORA(interval=3), veto=0.6, band=True))
    engine = assert_onnx_matches_eager(cached, inputs, TIMESTEPS, tmp_path / "ac")
    assert sum(engine.reused.values()) == round(adacache.summary(cached).hit_rate * 4 * len(TIMESTEPS))
