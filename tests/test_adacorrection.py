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
from helpers import run_against_reference, assert_onnx_matches_eager, denoise, moving
from test_runtime import TIMESTEPS, _embed, _final


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(1, 5), dim=st.integers(2, 6), seed=st.integers(0, 2**16), scale=st.floats(1e-2, 1e2))
def test_offset_terms_match_equations_1_and_2(batch, tokens, dim, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    cached = torch.randn(batch, tokens, dim, generator=gen, dtype=torch.float64) * scale
    x = cached + torch.randn(batch, tokens, dim, generator=gen, dtype=torch.float64) * scale * 0.3
    temporal, spatial = ops.adacorrection_terms(x, cached)
    # The op computes in float32, the channel variance from the first two moments
    # (E[x^2] - E[x]^2): where a token's channels are nearly equal, the difference loses a few
    # float32 ulps of E[x^2], so its square root, the standard deviation, may be off by up to
    # sqrt(8 eps E[x^2]) per token however small the spread. That is the bound, beside 1e-4.
    eps = float(np.finfo(np.float32).eps)
    for b in range(batch):
        norm = np.mean([np.linalg.norm(cached[b, i].numpy()) for i in range(tokens)])
        eq1 = np.mean([np.linalg.norm((x[b, i] - cached[b, i]).numpy()) for i in range(tokens)])
        eq2 = np.mean([np.std(x[b, i].numpy()) for i in range(tokens)])
        moments = np.mean([np.sqrt(8 * eps * np.mean(x[b, i].numpy() ** 2)) for i in range(tokens)]) / norm
        assert temporal[b].item() == pytest.approx(eq1 / norm, rel=1e-4)
        assert abs(spatial[b].item() - eq2 / norm) <= 1e-4 * eq2 / norm + moments
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
    s = lambda *v: torch.tensor(v)  # noqa: E731  (per-item scores)
    assert bool(ops.offset_decision(t, t, s(0.2, 0.1), 1.0, 0.0, 0.5)), "base proposes, offset small: reuse"
    assert not bool(ops.offset_decision(t, t, s(0.1, 0.6), 1.0, 0.0, 0.5)), "the worst item vetoes"
    assert not bool(ops.offset_decision(t, t, s(0.2), 4.0, 0.0, 0.5)), "gamma scales the score (w = 0.8)"
    assert bool(ops.offset_decision(f, t, s(0.05), 1.0, 0.1, 0.5)), "accept against the base"
    assert not bool(ops.offset_decision(f, t, s(0.05), 1.0, 0.0, 0.5)), "accept 0 is off"
    assert not bool(ops.offset_decision(f, f, s(0.0), 1.0, 0.1, 0.5)), "never without a valid cache"
    assert not bool(ops.offset_decision(t, t, s(0.1, float("nan")), 1.0, 0.9, 1.0)), "a NaN score computes"
    assert not bool(ops.offset_decision(t, t, s(float("inf")), 1.0, 0.0, 1.0)), "an infinite score computes"
    assert torch.allclose(ops.correct(torch.tensor(0.25), torch.zeros(3), torch.ones(3)), torch.full((3,), 0.25))


@given(scores=st.lists(st.floats(0, 5), min_size=1, max_size=4), gamma=st.floats(0.1, 4),
       accept=st.floats(0, 1), veto=st.floats(0.01, 1), base=st.booleans(), valid=st.booleans())
def test_decision_matches_the_clipped_weight_rule(scores, gamma, accept, veto, base, valid):
    """The fused predicate decides exactly as Eq. 6's clipped weight compared with the thresholds."""
    accept = min(accept, veto)
    w = min(1.0, max(0.0, gamma * max(scores)))
    expected = (base and valid and w < veto) or (valid and w < accept)
    got = ops.offset_decision(torch.tensor(base and valid), torch.tensor(valid), torch.tensor(scores, dtype=torch.float64), gamma, accept, veto)
    assert bool(got) == expected


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
    sites = cached.adacache.programs[0].layout.sites
    assert [(s.label, s.role, s.gated_by) for s in sites] == [
        ("blocks.0", "probe", None), ("blocks.1", "cached", "site_0"), ("blocks.2", "cached", "site_0"), ("blocks.3", "cached", "site_0"),
    ]
    with pytest.raises(ValueError, match="accept"):
        adacache.AdaCorrection(accept=0.6, veto=0.5)
    with pytest.raises(ValueError, match="base"):
        adacache.AdaCorrection(base="FORA")
    with pytest.raises(adacache.PolicyError, match=r"NoCache\(\) keeps no cache.*FORA\(interval=1\)"):
        adacache.AdaCorrection(base=adacache.NoCache())


def test_adacorrection_exports_to_onnx(tmp_path):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, adacache.AdaCorrection(base=adacache.FORA(interval=3), veto=0.6, band=True))
    engine = assert_onnx_matches_eager(cached, inputs, TIMESTEPS, tmp_path / "ac")
    assert sum(engine.reused.values()) == round(adacache.summary(cached).hit_rate * 4 * len(TIMESTEPS))


def test_spatial_term_without_lambda_is_not_computed_and_matches_std():
    x = torch.randn(2, 5, 7, dtype=torch.float64)
    cached = torch.randn(2, 5, 7, dtype=torch.float64)
    temporal, spatial = ops.adacorrection_terms(x, cached)
    assert torch.equal(ops.adacorrection_score(x, cached, 0.0), temporal)
    scale = cached.norm(dim=-1).mean(dim=1)
    assert torch.allclose(spatial.double(), x.std(dim=-1, unbiased=False).mean(dim=1) / scale, rtol=1e-5)


def reference_offset_scales(model, inputs, steps):
    """The calibration by hand: per block, median over consecutive steps of
    (true relative error of residual reuse) / (temporal offset score), worst batch item."""
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(model.blocks))}
    hooks = [block.register_forward_hook(lambda m, a, o, i=i: seen[i].append((a[0].clone(), o.clone())))
             for i, block in enumerate(model.blocks)]
    denoise(model, inputs, steps=steps)
    for h in hooks:
        h.remove()
    scales = {}
    for i, calls in seen.items():
        ratios = []
        for (x0, y0), (x1, y1) in zip(calls, calls[1:]):
            score = ops.adacorrection_terms(x1, x0)[0].max().item()
            err = max(((x1[b] + (y0[b] - x0[b]) - y1[b]).norm() / (y1[b] - x1[b]).norm()).item() for b in range(x1.shape[0]))
            ratios.append(err / score)
        scales[f"blocks.{i}"] = float(np.median(ratios))
    return scales


def test_calibration_fits_a_scale_per_block_that_predicts_reuse_error():
    model, still, _ = FAMILIES["tiny_dit"]()
    inputs = moving(still)
    policy = adacache.AdaCorrection(base=adacache.FORA(interval=3), veto=0.4)
    fitted = adacache.calibrate(model, policy, lambda d: denoise(d, inputs, steps=6))
    expected = reference_offset_scales(model, inputs, steps=6)
    assert fitted.scales.keys() == expected.keys()
    for name, value in expected.items():
        assert fitted.scales[name] == pytest.approx(value, rel=1e-4)
    assert fitted.calibrated and not policy.calibrated and fitted.veto == 0.4
    # The scale multiplies gamma in each unit's rule.
    cached = adacache.compile(model, fitted)
    denoise(cached, inputs)
    rules = {s.label: s.offset.gamma for s in cached.adacache.programs[0].cached_sites}
    assert rules == pytest.approx(fitted.scales)


def test_calibrated_scales_must_cover_the_model():
    model, inputs, _ = FAMILIES["tiny_dit"]()
    stale = adacache.AdaCorrection(base=adacache.FORA(interval=2), scales={"transformer_blocks.0": 2.0})
    with pytest.raises(adacache.PolicyError, match="re-run adacache.calibrate"):
        denoise(adacache.compile(model, stale), inputs)
    with pytest.raises(ValueError, match="scales"):
        adacache.AdaCorrection(scales={"blocks.0": -1.0})
    with pytest.raises(adacache.PolicyError, match="does not move between steps"):
        adacache.calibrate(model, adacache.AdaCorrection(base=adacache.FORA(interval=2)), lambda d: denoise(d, inputs))  # a constant latent
    with pytest.raises(adacache.PolicyError, match="nothing to calibrate"):
        adacache.calibrate(model, adacache.FORA(interval=2), lambda d: denoise(d, inputs))


def test_offset_corrected_reuse_is_the_default_and_base_form_is_an_option():
    model, inputs, _ = FAMILIES["tiny_dit"]()
    forms = {}
    for reuse in ("residual", "base"):
        cached = adacache.compile(model, adacache.AdaCorrection(base=adacache.FORA(interval=3), reuse=reuse))
        denoise(cached, inputs)
        forms[reuse] = {s.reuse for s in cached.adacache.programs[0].cached_sites}
    assert forms == {"residual": {"residual"}, "base": {"output"}}


def test_adacorrection_over_teacache_follows_its_gate_and_can_veto():
    model, still, n_blocks = FAMILIES["tiny_dit"]()
    inputs = moving(still)
    tea = adacache.TeaCache(0.6, coefficients=(0.5, 0.02))
    plain = adacache.compile(model, tea)
    expected = denoise(plain, inputs)
    base_steps = [r["reused"]["site_0"] for r in adacache.summary(plain).per_step]
    assert sum(base_steps) >= 2
    # veto=1 never vetoes: every block follows the TeaCache gate of the first one.
    composed = adacache.compile(model, adacache.AdaCorrection(base=tea, veto=1.0))
    got = denoise(composed, inputs)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6)
    sites = composed.adacache.programs[0].cached_sites
    assert [s.follows for s in sites] == [None] + ["site_0"] * (n_blocks - 1)
    assert sites[0].probe is not None and all(s.probe is None for s in sites[1:])
    per_step = adacache.summary(composed).per_step
    assert [[r["reused"][s.name] for s in sites] for r in per_step] == [[b] * n_blocks for b in base_steps]
    # A tight veto refuses the gate's proposals.
    strict = adacache.compile(model, adacache.AdaCorrection(base=tea, veto=1e-6))
    denoise(strict, inputs)
    assert adacache.summary(strict).hit_rate < adacache.summary(composed).hit_rate


def test_blend_band_over_a_taylor_forecast_runs_and_weight_one_is_the_fresh_output():
    model, still, _ = FAMILIES["tiny_dit"]()
    inputs = moving(still)
    expected = denoise(model, inputs)
    # gamma this large puts every weight at 1: nothing is reused and the blend returns the fresh output.
    cached = adacache.compile(model, adacache.AdaCorrection(base=adacache.TaylorSeer(order=1, interval=3), gamma=1e9, veto=1.0, band=True))
    for a, b in zip(denoise(cached, inputs), expected):
        assert torch.allclose(a, b, atol=1e-5)
    assert adacache.summary(cached).hit_rate == 0.0
    # A moderate weight blends the forecast in: the output moves away from full computation.
    blended = adacache.compile(model, adacache.AdaCorrection(base=adacache.TaylorSeer(order=1, interval=3), gamma=2.0, veto=1.0, band=True))
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(denoise(blended, inputs), expected))


def test_teacache_sum_follows_teacache_not_the_veto():
    """A veto on the first unit must not reset TeaCache's running sum: the gate's history is
    TeaCache's own, whatever AdaCorrection decides about individual blocks."""
    model, still, _ = FAMILIES["tiny_dit"]()
    inputs = moving(still)
    tea = adacache.TeaCache(0.6, coefficients=(0.5, 0.02))

    def sums(policy):
        cached = adacache.compile(model, policy)
        out = []
        with adacache.session(cached) as sess, torch.no_grad():
            for t in torch.linspace(950, 50, 8):
                cached(**inputs(t))
                slot = sess.slots[0]
                names = [spec.name for spec in slot.program.layout.states]
                out.append(float(slot.tensors[names.index("cache__site_0__acc")]))
        return out

    plain = sums(tea)
    assert any(v > 0 for v in plain)
    assert sums(adacache.AdaCorrection(base=tea, veto=1e-6)) == pytest.approx(plain)


def test_stored_scale_gives_the_same_score():
    """The graph stores the cached input's scale once; scoring with it equals scoring without."""
    gen = torch.Generator().manual_seed(3)
    cached = torch.randn(3, 5, 8, generator=gen)
    x = cached + 0.2 * torch.randn(3, 5, 8, generator=gen)
    for lam in (0.0, 0.7):
        assert torch.allclose(ops.adacorrection_score(x, cached, lam, ops.offset_scale(cached)), ops.adacorrection_score(x, cached, lam))
    half = ops.adacorrection_score(x.half(), cached.half(), 0.0, ops.offset_scale(cached.half()))
    assert half.dtype == torch.float32 and torch.allclose(half, ops.adacorrection_score(x, cached, 0.0), rtol=1e-2)


def reference_span_scale(model, inputs, steps):
    """Calibration of one span by hand: the span's input is the first block's input, its
    output the last block's; median of (residual-reuse error / temporal score)."""
    seen: list[list[torch.Tensor]] = []
    first = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append([a[0].clone()]))
    last = model.blocks[-1].register_forward_hook(lambda m, a, o: seen[-1].append(o.clone()))
    denoise(model, inputs, steps=steps)
    first.remove()
    last.remove()
    ratios = []
    for (x0, y0), (x1, y1) in zip(seen, seen[1:]):
        score = ops.adacorrection_terms(x1, x0)[0].max().item()
        err = max(((x1[b] + (y0[b] - x0[b]) - y1[b]).norm() / (y1[b] - x1[b]).norm()).item() for b in range(x1.shape[0]))
        ratios.append(err / score)
    return float(np.median(ratios))


def test_span_unit_decides_once_per_step_for_the_whole_span():
    model, still, n_blocks = FAMILIES["tiny_dit"]()
    inputs = moving(still)
    base = adacache.FORA(interval=2, reuse="residual")
    # Nothing vetoed (gamma tiny): exactly the base, with one site over every block.
    quiet = adacache.compile(model, adacache.AdaCorrection(base=base, gamma=1e-6, veto=0.5, unit="span"))
    expected = denoise(adacache.compile(model, base), inputs)
    assert all(torch.equal(a, b) for a, b in zip(expected, denoise(quiet, inputs)))
    sites = quiet.adacache.programs[0].cached_sites
    assert [(s.label, s.offset is not None) for s in sites] == [(f"blocks.0..{n_blocks - 1}", True)]
    assert adacache.summary(quiet).hit_rate == pytest.approx(0.5)
    # Every step vetoed (gamma huge): nothing reused, full computation's outputs.
    loud = adacache.compile(model, adacache.AdaCorrection(base=base, gamma=1e9, veto=0.5, unit="span"))
    got = denoise(loud, inputs)
    assert adacache.summary(loud).hit_rate == 0.0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(denoise(model, inputs), got))
    # Calibration fits one scale for the span, keyed by its label.
    fitted = adacache.calibrate(model, adacache.AdaCorrection(base=base, veto=0.4, unit="span"), lambda d: denoise(d, inputs, steps=6))
    assert fitted.scales == pytest.approx({f"blocks.0..{n_blocks - 1}": reference_span_scale(model, inputs, steps=6)}, rel=1e-4)
    with pytest.raises(ValueError, match="unit"):
        adacache.AdaCorrection(unit="layer")


def test_span_unit_exports_to_onnx(tmp_path):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, adacache.AdaCorrection(base=adacache.TaylorSeer(order=1, interval=3), veto=0.6, unit="span"))
    assert_onnx_matches_eager(cached, inputs, TIMESTEPS, tmp_path / "span")


def test_the_base_decides_its_own_schedule():
    """AdaCorrection asks its base whether a step may reuse (``allow_reuse``), not only for the
    base's schedule spec: a base whose decision reads more than the step (the request's length,
    as MagCache's does) keeps its decisions under AdaCorrection."""
    from adacache.policies.base import policy_dataclass

    @policy_dataclass
    class OnlyInSecondHalf(adacache.FORA):
        def allow_reuse(self, ctx, site):
            return ctx.total_steps is not None and ctx.step >= ctx.total_steps // 2 and super().allow_reuse(ctx, site)

    model, inputs, _ = FAMILIES["tiny_dit"]()
    base = OnlyInSecondHalf(interval=2)
    cached = adacache.compile(model, adacache.AdaCorrection(base=base, accept=0.0, veto=1.0))
    with torch.no_grad(), adacache.session(cached, total_steps=len(TIMESTEPS)):
        for t in TIMESTEPS:
            cached(**inputs(t))
    reused = [any(row["reused"].values()) for row in adacache.summary(cached).per_step]
    half = len(TIMESTEPS) // 2
    assert not any(reused[:half]) and any(reused[half:]), reused
