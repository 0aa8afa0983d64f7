"""TaylorSeer: the schedule math against a direct formula, and the policy against a hand loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import adacache
from adacache.stepping import allow_reuse, computed_steps, forecast_controls
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


def taylor_weight(k: int, j: int) -> float:
    return k**j / math.factorial(j)


def reference_taylorseer(model, inputs, interval, order, warmup, restart_at=None, weight=taylor_weight):
    """Block-residual TaylorSeer by hand: finite differences at full steps, forecast between
    (``weight(k, j)`` on the j-th difference, k steps after the last full step); at
    ``restart_at`` everything computed before is forgotten (an inferred request's restart)."""
    derivs: dict[int, list[torch.Tensor]] = {}
    full_steps: list[int] = []
    outs = []
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            if step == restart_at:
                derivs, full_steps = {}, []
            h, c = _embed(model, inputs(t))
            reuse = step >= warmup and (step - warmup) % interval != 0 and full_steps
            for i, block in enumerate(model.blocks):
                if reuse:
                    k = step - full_steps[-1]
                    d = derivs[i]
                    forecast = sum(d[j] * weight(k, j) for j in range(min(order, len(full_steps) - 1) + 1))
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


def test_after_a_restart_the_forecast_counts_from_the_restarted_step():
    # A bare loop restarts its caches at step 1 (issue 31): the full steps the caches hold are
    # step 1 and the scheduled ones after it, never step 0's computation, which was dropped.
    schedule = {"kind": "interval", "interval": 5, "warmup": 1}  # computes 0, 1, 6, 11, ...
    assert computed_steps(schedule, 6) == [0, 1] and computed_steps(schedule, 6, fresh_from=1) == [1]
    assert computed_steps(schedule, 12, fresh_from=1) == [1, 6, 11]
    assert computed_steps(schedule, 1, fresh_from=1) == []
    # At step 6 an explicit request estimates the second difference (three full steps: 0, 1, 6);
    # after the restart only the first one can be (full steps 1 and 6).
    assert forecast_controls(schedule, 6, 2) == ([1.0, 0.0, 0.0], [1.0, 0.2, 0.2])
    assert forecast_controls(schedule, 6, 2, fresh_from=1) == ([1.0, 0.0, 0.0], [1.0, 0.2, 0.0])
    # Forecasting step 3 of a FORA-like schedule restarted at a step it meant to reuse (interval 3:
    # computes 0, 3, ...): the value is 2 steps old, from the restart's computation at step 1.
    fora_like = {"kind": "interval", "interval": 3, "warmup": 0}
    assert forecast_controls(fora_like, 2, 1, fresh_from=1) == ([1.0, 0.0], [1.0, 0.0])
    assert forecast_controls(fora_like, 4, 1, fresh_from=1) == ([1.0, 1.0], [1.0, 0.0])
    assert forecast_controls(fora_like, 3, 1, fresh_from=1) == ([1.0, 0.0], [1.0, 0.5])


@pytest.mark.parametrize("order", [0, 1, 2])
def test_taylorseer_matches_hand_written_loop(order):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    expected = reference_taylorseer(model, inputs, interval=3, order=order, warmup=1)
    cached = adacache.compile(model, adacache.TaylorSeer(order=order, interval=3, warmup=1, granularity="block"))
    got = denoise(cached, inputs)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert torch.allclose(a, b, atol=1e-5), f"step {step}"
    assert adacache.summary(cached).hit_rate == pytest.approx(4 / 8)


@pytest.mark.parametrize("order", [1, 2])
def test_a_bare_loop_forecasts_from_its_restarted_step(order, tmp_path):
    """Issue 31: a bare loop (no request announced) restarts its caches at step 1 and keeps the
    schedule; with interval 3 and no warm-up, step 1 was meant to be forecast, so it computes
    instead and the next forecasts extrapolate from it. The eager model and the exported
    engine both match the hand-written loop that forgets step 0 at step 1."""
    model, inputs, _ = FAMILIES["tiny_dit"]()
    expected = reference_taylorseer(model, inputs, interval=3, order=order, warmup=0, restart_at=1)
    cached = adacache.compile(model, adacache.TaylorSeer(order=order, interval=3, warmup=0))
    with torch.no_grad():
        got = [cached(**inputs(t)).clone() for t in TIMESTEPS]
    records = cached.adacache.current_session().stats.records
    assert [r.step for r in records] == list(range(len(TIMESTEPS)))
    assert [any(map(bool, r.reused.values())) for r in records] == [False, False] + [s % 3 != 0 for s in range(2, len(TIMESTEPS))]
    for step, (a, b) in enumerate(zip(expected, got)):
        assert torch.allclose(a, b, atol=1e-5), f"step {step}: {float((a - b).abs().max())}"
    pytest.importorskip("onnxruntime")
    engine = adacache.load(adacache.export(cached, tmp_path / "ts", example_inputs=((), inputs(TIMESTEPS[0]))), provider="cpu")
    for step, t in enumerate(TIMESTEPS):
        out = engine(**{k: v.numpy() for k, v in inputs(t).items()})["output_0"]
        assert abs(out - got[step].numpy()).max() < 1e-4, f"engine, step {step}"


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


def test_taylor_update_refreshes_reanchors_and_resets():
    """The three cases of ops.taylor_update against direct formulas (order 2)."""
    from adacache import ops

    gen = torch.Generator().manual_seed(0)
    fresh, d0, d1, d2 = (torch.randn(2, 3, generator=gen) for _ in range(4))
    yes, no = torch.tensor(True), torch.tensor(False)
    # A scheduled full step, dt = 2: finite differences.
    new = ops.taylor_update(yes, torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 0.5, 0.5]), fresh, d0, d1, d2)
    assert torch.allclose(new[0], fresh)
    assert torch.allclose(new[1], (fresh - d0) / 2)
    assert torch.allclose(new[2], (new[1] - d1) / 2)
    # A forecast step (k = 2) where the site computed anyway: re-anchored, slopes kept, so the
    # forecast at this step is the fresh value and later ones continue from it.
    coef = torch.tensor([1.0, 2.0, 2.0])
    new = ops.taylor_update(yes, coef, torch.tensor([1.0, 0, 0]), fresh, d0, d1, d2)
    assert torch.equal(new[1], d1) and torch.equal(new[2], d2)
    assert torch.allclose(ops.taylor_forecast(coef, *new), fresh, atol=1e-6)
    later = ops.taylor_forecast(torch.tensor([1.0, 3.0, 4.5]), *new)
    assert torch.allclose(later, fresh + (3 - 2) * d1 + (4.5 - 2) * d2, atol=1e-6)
    # Without a valid cache the old terms are never read, even when they hold NaN.
    nan = torch.full((2, 3), float("nan"))
    new = ops.taylor_update(no, coef, torch.tensor([1.0, 0.5, 0.5]), fresh, nan, nan, nan)
    assert torch.equal(new[0], fresh) and not new[1].any() and not new[2].any()


def reference_vetoed_taylorseer(model, inputs, interval, veto):
    """AdaCorrection over block-residual TaylorSeer (order 1, warmup 1) by hand: a vetoed
    forecast computes the block and re-anchors its expansion at the fresh residual."""
    from adacache import ops

    state: dict[int, list[torch.Tensor]] = {}  # block -> [D0, D1, cached input]
    full_steps: list[int] = []
    outs, flags = [], []
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            h, c = _embed(model, inputs(t))
            scheduled_reuse = step >= 1 and (step - 1) % interval != 0 and bool(full_steps)
            k = step - full_steps[-1] if full_steps else 0
            slope_known = len(full_steps) >= 2
            row = []
            for i, block in enumerate(model.blocks):
                use = False
                if scheduled_reuse and i in state:
                    use = min(1.0, ops.adacorrection_terms(h, state[i][2])[0].max().item()) < veto
                row.append(use)
                d = state.get(i)
                if use:
                    h = h + d[0] + (k * d[1] if slope_known else 0)
                    continue
                out = block(h, c)
                r = out - h
                if d is None:
                    state[i] = [r, torch.zeros_like(r), h.clone()]
                elif scheduled_reuse:  # vetoed: re-anchor, keep the slope
                    slope = d[1] if slope_known else torch.zeros_like(r)
                    state[i] = [r - k * slope, slope, h.clone()]
                else:
                    state[i] = [r, (r - d[0]) / (step - full_steps[-1]), h.clone()]
                h = out
            if not scheduled_reuse:
                full_steps.append(step)
            flags.append(row)
            outs.append(_final(model, h, c))
    return outs, flags


def test_a_vetoed_taylor_forecast_reanchors_instead_of_dropping_its_slope():
    from helpers import run_against_reference

    model, inputs, n_blocks = FAMILIES["tiny_dit"]()
    veto = 0.4
    expected, reused = reference_vetoed_taylorseer(model, inputs, interval=5, veto=veto)
    policy = adacache.AdaCorrection(base=adacache.TaylorSeer(order=1, interval=5, warmup=1), veto=veto)
    cached = adacache.compile(model, policy, example_inputs=((), inputs(TIMESTEPS[0])))
    run_against_reference(cached, inputs, TIMESTEPS, expected)
    got = [[rec["reused"][f"site_{i}"] for i in range(n_blocks)] for rec in adacache.summary(cached).per_step]
    assert got == reused
    # The case this pins: a block vetoed inside a window and reused later in the same window.
    assert any(not reused[s][b] and reused[s + 1][b] for s in range(len(reused) - 1) for b in range(n_blocks)
               if any(reused[s])), reused
