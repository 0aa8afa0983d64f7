"""Pyramid Attention Broadcast against diffusers' PAB hooks on the same weights: the same
attention calls skipped at the same steps, the same outputs; its kinds of attention, its
timestep window and its refusals."""

from __future__ import annotations

import copy

import pytest
import torch

import adacache
from adacache.stepping import allow_reuse, on_thousand_scale
from families import FAMILIES

pytest.importorskip("diffusers")

TIMESTEPS = torch.linspace(999, 1, 12).round()  # inside (100, 800) from the 3rd step to the 10th


def _moving(inputs):
    def step(t):
        kw = inputs(t)
        return dict(kw, hidden_states=kw["hidden_states"] * (1 + t / 5000))
    return step


def _diffusers_run(model, inputs, **config):
    """Outputs of diffusers' PAB hooks, with the timestep its pipelines report."""
    from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    model = copy.deepcopy(model)
    current = {"t": None}
    apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: current["t"], **config))
    outputs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            current["t"] = int(t)
            outputs.append(model(**inputs(t)).sample)
    return outputs


@pytest.mark.parametrize("spatial, cross", [(2, None), (3, 4), (None, 2)])
def test_skips_what_diffusers_skips_with_the_same_outputs(spatial, cross):
    model, inputs, _ = FAMILIES["pixart"]()
    inputs = _moving(inputs)
    expected = _diffusers_run(model, inputs, spatial_attention_block_skip_range=spatial, cross_attention_block_skip_range=cross)
    compiled = adacache.compile(model, adacache.PAB(spatial_interval=spatial, cross_interval=cross))
    compiled.adacache.new_request()
    with torch.no_grad():
        got = [compiled(**inputs(t)).sample for t in TIMESTEPS]
    full = [model(**inputs(t)).sample for t in TIMESTEPS]
    rows = adacache.summary(compiled).per_step
    sites = compiled.adacache.programs[0].cached_sites
    assert {s.group for s in sites} == {k for k, n in (("spatial", spatial), ("cross", cross)) if n}
    assert all(s.label.endswith("attn1" if s.group == "spatial" else "attn2") for s in sites)
    for step, row in enumerate(rows):
        t = float(TIMESTEPS[step])
        for site in sites:
            interval = spatial if site.group == "spatial" else cross
            assert bool(row["reused"][site.name]) == (step > 0 and 100 < t < 800 and step % interval != 0), (step, site.label)
    assert any(any(map(bool, r["reused"].values())) for r in rows)
    for step, (a, b, c) in enumerate(zip(got, expected, full)):
        assert torch.allclose(a, b, atol=1e-5), f"step {step}: {float((a - b).abs().max())}"
    assert not all(torch.allclose(a, c, atol=1e-5) for a, c in zip(got, full)), "reuse must change something, or the test proves nothing"


def test_the_window_reads_timesteps_on_the_thousand_scale():
    schedule = {"kind": "interval", "interval": 2, "warmup": 0, "timestep_window": [100, 800]}
    assert allow_reuse(schedule, 1, timestep=500.0) and allow_reuse(schedule, 1, timestep=0.5)
    assert not allow_reuse(schedule, 1, timestep=900.0) and not allow_reuse(schedule, 1, timestep=0.05)
    assert not allow_reuse(schedule, 1, timestep=None), "without a timestep nothing is inside the window"
    assert not allow_reuse(schedule, 2, timestep=500.0), "the interval's full steps compute"
    assert on_thousand_scale(0.25) == 250.0 and on_thousand_scale(250.0) == 250.0
    with pytest.raises(ValueError, match="timestep window"):
        from adacache.stepping import forecast_controls
        forecast_controls(schedule, 3, 1)


def test_flux_timesteps_divided_by_a_thousand_reuse_inside_the_window():
    model, inputs, _ = FAMILIES["flux"]()
    compiled = adacache.compile(model, adacache.PAB())
    compiled.adacache.new_request()
    with torch.no_grad():
        for t in TIMESTEPS:
            compiled(**inputs(t))
    reused = [any(map(bool, r["reused"].values())) for r in adacache.summary(compiled).per_step]
    assert reused == [s > 0 and 100 < float(t) < 800 and s % 2 != 0 for s, t in enumerate(TIMESTEPS)]


@pytest.mark.parametrize("make, message", [
    (lambda: adacache.PAB(spatial_interval=None), "every interval is None"),
    (lambda: adacache.PAB(spatial_interval=0), "spatial_interval"),
    (lambda: adacache.PAB(cross_window=(800, 100)), "low < high"),
    (lambda: adacache.PAB(temporal_window=(1, 2, 3)), "temporal_window"),
])
def test_bad_parameters_are_refused(make, message):
    with pytest.raises(adacache.PolicyError, match=message):
        make()


def test_a_model_without_the_kind_asked_for_is_refused_with_what_it_has():
    model, inputs, _ = FAMILIES["tiny_dit"]()
    compiled = adacache.compile(model, adacache.PAB(spatial_interval=None, cross_interval=3))
    with pytest.raises(adacache.PolicyError, match=r"kinds \['spatial'\].*cross"), torch.no_grad():
        compiled(**inputs(TIMESTEPS[0]))  # the blocks are found at the first call
