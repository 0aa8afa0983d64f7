"""Z-Cache: the reflection weight, the runtime-owned loop, and its refusals."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import adacache
from adacache.policies.zcache import reflection_weight
from families import FAMILIES


@given(t1=st.integers(0, 30), width=st.integers(1, 10))
def test_reflection_weight_is_the_papers_logarithmic_average_in_step_order(t1, width):
    t2 = t1 + width
    weights = [reflection_weight(k, t1, t2) for k in range(t1 + 1, t2 + 1)]
    assert weights[-1] == pytest.approx(1.0), "the new anchor's own features at the new anchor"
    assert all(0 < w <= 1 for w in weights)
    assert all(a < b for a, b in zip(weights, weights[1:])), "the nearer the new anchor, the more it counts"
    # The paper's formula in diffusion timesteps (T1 = the new anchor's, T2 = the earlier one's).
    T1, T2 = 1000 - 20 * t2, 1000 - 20 * t1
    for k, w in zip(range(t1 + 1, t2 + 1), weights):
        K = 1000 - 20 * k
        assert w == pytest.approx(math.log((T2 - K) / 20 + 1) / math.log((T2 - T1) / 20 + 1))
    with pytest.raises(ValueError):
        reflection_weight(t1, t1, t2)
    linear = [reflection_weight(k, t1, t2, "linear") for k in range(t1 + 1, t2 + 1)]
    assert linear == pytest.approx([(k - t1) / width for k in range(t1 + 1, t2 + 1)])
    assert all(lin <= log + 1e-12 for lin, log in zip(linear, weights)), "the logarithm front-loads the new anchor"
    with pytest.raises(ValueError, match="kind"):
        reflection_weight(t2, t1, t2, "cosine")


def _setup(policy):
    from diffusers import DDIMScheduler

    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, policy)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(12)
    kw = inputs(torch.tensor(0.0))
    labels = kw["class_labels"]

    def denoise(m, x, t):
        return m(x=x, timestep=t.expand(x.shape[0]).float(), class_labels=labels)[:, :4]

    return model, cached, scheduler, kw["x"], denoise


def test_sample_without_reflection_is_the_plain_loop():
    model, cached, scheduler, x0, denoise = _setup(adacache.TaylorSeer(order=1, interval=3))
    got = adacache.sample(cached, scheduler, x0, denoise)
    scheduler.set_timesteps(12)
    x = x0
    again = adacache.compile(model, adacache.TaylorSeer(order=1, interval=3))
    again.adacache.new_request()  # an explicit boundary, as sample() sets one
    with torch.inference_mode():
        for t in scheduler.timesteps:
            x = scheduler.step(denoise(again, x, t), t, x).prev_sample
    assert torch.equal(got, x)


@pytest.mark.parametrize("interval", [3, 4])
def test_reflection_with_the_old_anchor_alone_reproduces_the_base(monkeypatch, interval):
    """Weight 0 replays each window with the base's own forecasts, and step t2 on the same latent
    with the fresh features: the trajectory must be the base's, which pins the replay mechanics
    (state forecasts, scheduler roll-back, slot order) apart from the blend itself."""
    import adacache.runtime.sampling as runtime_sampling

    base = adacache.TaylorSeer(order=1, interval=interval)
    model, cached, scheduler, x0, denoise = _setup(base)
    expected = adacache.sample(cached, scheduler, x0, denoise)
    monkeypatch.setattr(runtime_sampling, "reflection_weight", lambda k, t1, t2, kind="log": 1.0 if k == t2 else 0.0)
    zcache = adacache.compile(model, adacache.ZCache(base=base))
    got = adacache.sample(zcache, scheduler, x0, denoise)
    assert zcache.adacache.current_session().stats.replays > 0
    assert torch.allclose(got, expected, atol=1e-5)


def test_runtime_loop_shows_progress_on_request(capsys):
    _, cached, scheduler, x0, denoise = _setup(adacache.ZCache(base=adacache.TaylorSeer(order=1, interval=3)))
    quiet = adacache.sample(cached, scheduler, x0, denoise)
    assert "sampling" not in capsys.readouterr().err
    shown = adacache.sample(cached, scheduler, x0, denoise, progress=True)
    err = capsys.readouterr().err
    assert "sampling: 100%" in err and "12/12" in err
    assert torch.equal(quiet, shown)


def test_zcache_reflects_each_window_at_small_extra_cost():
    model, cached, scheduler, x0, denoise = _setup(adacache.ZCache(base=adacache.TaylorSeer(order=1, interval=3)))
    out = adacache.sample(cached, scheduler, x0, denoise)
    assert torch.isfinite(out).all()
    stats = cached.adacache.current_session().stats
    # full steps at 0, 1, 4, 7, 10 (warmup 1, interval 3): windows (1, 4], (4, 7], (7, 10] replay 3 calls each
    assert stats.replays == 9
    summary = adacache.summary(cached)
    assert summary.hit_rate == pytest.approx(7 / 12)
    plain = adacache.sample(adacache.compile(model, adacache.TaylorSeer(order=1, interval=3)), scheduler, x0, denoise)
    assert not torch.allclose(out, plain), "reflection changes the trajectory"
    linear = adacache.ZCache(base=adacache.TaylorSeer(order=1, interval=3), weight="linear")
    assert not torch.allclose(out, adacache.sample(adacache.compile(model, linear), scheduler, x0, denoise)), "the weight is used"


@pytest.mark.parametrize("reflect_final_window, replays", [(False, 6), (True, 9)])
def test_the_window_closing_at_the_last_step_is_reflected_only_on_request(reflect_final_window, replays):
    policy = adacache.ZCache(base=adacache.TaylorSeer(order=1, interval=3), reflect_final_window=reflect_final_window)
    _, cached, scheduler, x0, denoise = _setup(policy)
    scheduler.set_timesteps(11)  # full steps at 0, 1, 4, 7 and 10, the last
    adacache.sample(cached, scheduler, x0, denoise)
    stats = cached.adacache.current_session().stats
    assert not any(bool(flag) for rec in stats.records if rec.step == 10 for flag in rec.reused.values())
    assert stats.replays == replays


def test_reference_sampler_hands_zcache_to_the_runtime_loop():
    from adacache.reference import load_reference_model, sample
    from adacache.reference.model import build_scheduler

    model = load_reference_model()
    policy = adacache.ZCache(base=adacache.TaylorSeer(order=1, interval=3))
    cached = adacache.compile(model, policy)
    with torch.inference_mode():
        got = sample(cached, [1, 7], seeds=[0, 1], num_steps=10, guidance_scale=2.0)
    assert cached.adacache.current_session().stats.replays > 0, "reflection ran"
    # The same generation written against adacache.sample directly.
    from adacache.reference.sampling import initial_noise

    scheduler = build_scheduler("ddim")
    scheduler.set_timesteps(10)
    labels = torch.tensor([1, 7, 10, 10])

    def denoise(m, x, t):
        out = m(hidden_states=torch.cat([x, x]), timestep=torch.full((4,), int(t)), class_labels=labels).sample
        c, u = out[:, :1].chunk(2)
        return u + 2.0 * (c - u)

    direct = adacache.sample(adacache.compile(model, policy), scheduler, initial_noise([0, 1], (1, 16, 16)) * scheduler.init_noise_sigma, denoise)
    assert torch.allclose(got, direct.clamp(-1, 1), atol=1e-5)


def test_zcache_over_teacache_reflects_the_adaptive_windows_it_took():
    tea = adacache.TeaCache(0.3, coefficients=(0.5, 0.0))
    model, cached, scheduler, x0, denoise = _setup(adacache.ZCache(base=tea))
    out = adacache.sample(cached, scheduler, x0, denoise)
    stats = cached.adacache.current_session().stats
    full = [rec.step for rec in stats.records if not bool(rec.reused["site_0"])]
    windows = [(a, b) for a, b in zip(full, full[1:]) if b - a > 1 and b < 11]  # step 11 is the last
    assert windows, "the threshold leaves some windows to reflect"
    # each window (t1, t2] replays its intermediate steps and step t2, without block compute
    assert stats.replays == sum(b - a for a, b in windows)
    plain = adacache.sample(adacache.compile(model, tea), scheduler, x0, denoise)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain), "reflection changes the trajectory"


def test_zcache_with_interval_one_has_nothing_to_reflect():
    model, cached, scheduler, x0, denoise = _setup(adacache.ZCache(base=adacache.TaylorSeer(order=1, interval=1)))
    out = adacache.sample(cached, scheduler, x0, denoise)
    scheduler.set_timesteps(12)
    x = x0
    with torch.inference_mode():
        for t in scheduler.timesteps:
            x = scheduler.step(denoise(model, x, t), t, x).prev_sample
    assert torch.allclose(out, x, atol=1e-5)
    assert cached.adacache.current_session().stats.replays == 0


def test_zcache_refuses_what_it_cannot_do(tmp_path):
    from diffusers import DDPMScheduler

    model, cached, scheduler, x0, denoise = _setup(adacache.ZCache())
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    ddpm.set_timesteps(10)
    with pytest.raises(adacache.PolicyError, match="draws fresh noise"):
        adacache.sample(cached, ddpm, x0, denoise)
    with pytest.raises(adacache.PolicyError, match="eta"):
        adacache.sample(cached, scheduler, x0, denoise, step_kwargs={"eta": 0.5})
    with pytest.raises(adacache.PolicyError, match="TaylorSeer"):
        adacache.ZCache(base=adacache.FORA(interval=3))
    with pytest.raises(adacache.PolicyError, match="reflect_final_window must be a bool"):
        adacache.ZCache(reflect_final_window="yes")
    with pytest.raises(adacache.PolicyError, match="weight must be 'log' or 'linear'"):
        adacache.ZCache(weight="cosine")
    _, inputs, _ = FAMILIES["tiny_dit"]()
    with pytest.raises(adacache.ExportError, match="ZCache cannot be exported to onnx"):
        adacache.export(cached, tmp_path / "z", example_inputs=((), inputs(torch.tensor(900.0))))


def test_reflection_cost_is_reported():
    _, cached, scheduler, x0, denoise = _setup(adacache.ZCache(base=adacache.TaylorSeer(order=1, interval=3)))
    adacache.sample(cached, scheduler, x0, denoise)
    summary = adacache.summary(cached)
    assert summary.replays == 9
    assert 0 < summary.reflection_flops < 0.25, "a replay runs only the non-block part"
    assert "reflection: 9 replayed calls" in str(summary)
