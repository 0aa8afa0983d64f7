"""MagCache against diffusers' MagCache hooks on the same weights: the same skipped steps, the
same outputs, the same calibrated ratio curve; and its refusals."""

from __future__ import annotations

import warnings

import pytest
import torch

import adacache
from adacache.policies.magcache import resample, reuse_steps
from families import FAMILIES
from helpers import moving

pytest.importorskip("diffusers")

STEPS = 12
TIMESTEPS = torch.linspace(950, 50, STEPS).round()
#: A decaying curve like the reference model's (ratios a little under 1), with a bump.
RATIOS = (1.0, 1.02, 0.99, 0.985, 0.98, 0.99, 0.975, 0.97, 0.96, 0.95, 0.93, 0.9)


def _dit():
    model, inputs, _ = FAMILIES["diffusers_dit"]()
    return model, moving(inputs)


class _BlockRuns:
    """Counts the calls in which diffusers' first block really ran its attention."""

    def __init__(self, model):
        self.ran: list[bool] = []
        self._this_call = False
        model.transformer_blocks[0].attn1.register_forward_pre_hook(self._mark)

    def _mark(self, module, args):
        self._this_call = True

    def end_call(self):
        self.ran.append(self._this_call)
        self._this_call = False


def _diffusers_run(model, inputs, **params):
    """Steps skipped and outputs of diffusers' MagCache, driven as its pipelines do."""
    from adacache.bench.anchors import AnchorConfig, apply_anchor

    runs = _BlockRuns(model)
    anchor = apply_anchor(model, AnchorConfig("diffusers", "MagCache", {**params, "num_inference_steps": STEPS}), instrument=False)
    outputs = []
    try:
        anchor.new_generation()
        with torch.no_grad():
            for t in TIMESTEPS:
                outputs.append(anchor.denoiser(**inputs(t)).sample)
                runs.end_call()
    finally:
        anchor.remove()
    return [not ran for ran in runs.ran], outputs


def _adacache_run(model, inputs, policy, total_steps=STEPS):
    compiled = adacache.compile(model, policy)
    with torch.no_grad(), adacache.session(compiled, total_steps=total_steps):
        outputs = [compiled(**inputs(t)).sample for t in TIMESTEPS]
    skipped = [any(row["reused"].values()) for row in adacache.summary(compiled).per_step]
    return skipped, outputs


@pytest.mark.parametrize("threshold,max_skip_steps,retention_ratio", [(0.06, 3, 0.2), (0.02, 2, 0.0), (0.3, 5, 0.3)])
def test_skips_the_steps_diffusers_skips_with_the_same_outputs(threshold, max_skip_steps, retention_ratio):
    model, inputs = _dit()
    params = dict(threshold=threshold, max_skip_steps=max_skip_steps, retention_ratio=retention_ratio)
    expected_skips, expected = _diffusers_run(model, inputs, **params, mag_ratios=list(RATIOS))
    skipped, got = _adacache_run(model, inputs, adacache.MagCache(**params, mag_ratios=RATIOS))
    assert skipped == expected_skips
    assert any(skipped), "the setting skips something, so the comparison means something"
    for step, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), f"step {step}: max diff {(a - b).abs().max():.3g}"


def test_a_curve_of_another_length_is_resampled_as_diffusers_does():
    from diffusers.hooks.mag_cache import nearest_interp

    curve = torch.linspace(1.0, 0.8, 7).tolist()
    for steps in (1, 5, 7, 12, 50):
        assert torch.equal(resample(curve, steps), nearest_interp(torch.tensor(curve), steps))
    model, inputs = _dit()
    expected_skips, _ = _diffusers_run(model, inputs, threshold=0.1, mag_ratios=curve)
    skipped, _ = _adacache_run(model, inputs, adacache.MagCache(threshold=0.1, mag_ratios=tuple(curve)))
    assert skipped == expected_skips


def test_calibration_measures_the_curve_diffusers_measures():
    model, inputs = _dit()
    from adacache.bench.anchors import AnchorConfig, apply_anchor

    def generation(denoiser):
        for t in TIMESTEPS:
            denoiser(**inputs(t))

    anchor = apply_anchor(model, AnchorConfig("diffusers", "MagCache", {"num_inference_steps": STEPS}), calibration=generation, instrument=False)
    expected = anchor.stats()["anchor"]["mag_ratios"]  # rounded to 5 digits by the adapter
    anchor.remove()
    fitted = adacache.calibrate(model, adacache.MagCache(), generation)
    assert len(fitted.mag_ratios) == STEPS
    assert fitted.mag_ratios == pytest.approx(expected, abs=2e-5)
    # ... and it is usable as it comes: it compiles and skips where the curve allows.
    skipped, _ = _adacache_run(model, inputs, adacache.MagCache(threshold=0.5, mag_ratios=fitted.mag_ratios))
    assert any(skipped)


def test_decisions_follow_equation_30():
    """Hand-computed: ratios 0.9 from the start, threshold 0.25, K = 2, no retention.
    Step 1: R = 0.9, E = 0.1 -> skip; step 2: R = 0.81, E = 0.29 -> compute, reset;
    step 3: skip (E = 0.1); step 4: compute; ..."""
    decisions = reuse_steps((1.0,) + (0.9,) * 7, 8, 0.25, 2, 0.0)
    assert decisions == (False, True, False, True, False, True, False, True)
    # K bounds a run of skips even where the error allows more.
    assert reuse_steps((1.0,) * 8, 8, 0.25, 2, 0.0) == (False, True, True, False, True, True, False, True)
    # Retention: the first int(0.5 * 8 + 0.5) = 4 steps compute.
    assert reuse_steps((1.0,) * 8, 8, 0.25, 2, 0.5)[:4] == (False,) * 4


def test_without_ratios_compile_says_to_calibrate():
    model, _ = _dit()
    with pytest.raises(adacache.PolicyError, match=r"adacache.calibrate\(model, adacache.MagCache\(\), run\)"):
        adacache.compile(model, adacache.MagCache())


@pytest.mark.parametrize("bad", [dict(threshold=-1), dict(max_skip_steps=0), dict(retention_ratio=1.5), dict(mag_ratios=()),
                                 dict(mag_ratios=(1.0, float("nan"))), dict(mag_ratios=(1.0, 0.0))])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(adacache.PolicyError, match="MagCache"):
        adacache.MagCache(**bad)


def test_an_unknown_request_length_assumes_the_curve_and_says_so():
    model, inputs = _dit()
    compiled = adacache.compile(model, adacache.MagCache(threshold=0.1, mag_ratios=RATIOS))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        compiled.adacache.new_request()  # no total_steps
        for t in TIMESTEPS:
            compiled(**inputs(t))
    assert any("MagCache does not know how many steps" in str(w.message) for w in caught)
    skipped = [any(row["reused"].values()) for row in adacache.summary(compiled).per_step]
    assert skipped == list(reuse_steps(RATIOS, len(RATIOS), 0.1, 3, 0.2))


def test_export_is_refused_with_the_reason(tmp_path):
    model, inputs = _dit()
    compiled = adacache.compile(model, adacache.MagCache(mag_ratios=RATIOS))
    with pytest.raises(adacache.ExportError, match="MagCache cannot be exported to onnx"):
        adacache.export(compiled, tmp_path / "magcache", example_inputs=((), inputs(TIMESTEPS[0])))


def test_under_adacorrection_the_base_keeps_its_schedule():
    model, inputs = _dit()
    base = adacache.MagCache(threshold=0.1, mag_ratios=RATIOS)
    skipped, _ = _adacache_run(model, inputs, adacache.AdaCorrection(base=base, accept=0.0, veto=1.0))
    alone, _ = _adacache_run(model, inputs, base)
    assert skipped == alone and any(skipped)
