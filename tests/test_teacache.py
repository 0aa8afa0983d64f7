"""TeaCache: the gate math against a direct formula, a hand-written loop, calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adacache
from adacache import ops
from families import FAMILIES
from helpers import run_against_reference, assert_onnx_matches_eager, denoise
from test_runtime import TIMESTEPS, _embed, _final
from adacache.models.dit import modulate


def test_gate_accumulates_rescaled_change():
    prev = torch.ones(2, 3, 4)
    probe = prev * 1.1  # relative L1 change 0.1 for both items
    passes, total, rescaled = ops.teacache_gate(probe, prev, torch.tensor(0.05), (2.0, 0.01), 0.3)
    assert rescaled.item() == pytest.approx(2.0 * 0.1 + 0.01)
    assert total.item() == pytest.approx(0.05 + 0.21)
    assert bool(passes)
    assert not bool(ops.teacache_gate(probe, prev, torch.tensor(0.1), (2.0, 0.01), 0.3)[0])
    assert ops.polyval((1.0, -2.0, 3.0), torch.tensor(2.0)).item() == pytest.approx(np.polyval([1, -2, 3], 2.0))


def reference_teacache(model, inputs, threshold, coefficients, warmup):
    """TeaCache by hand on the built-in DiT: modulated input of block 0's attention."""
    prev = None
    acc = 0.0
    residual = None
    outs, reused = [], []
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            h, c = _embed(model, inputs(t))
            block0 = model.blocks[0]
            shift, scale, *_ = block0.adaLN_modulation(c).chunk(6, dim=1)
            probe = modulate(block0.norm1(h), shift, scale)
            use = False
            if prev is not None:
                change = max(((probe[b] - prev[b]).abs().mean() / prev[b].abs().mean()).item() for b in range(probe.shape[0]))
                total = acc + max(0.0, float(np.polyval(coefficients, change)))
                use = step >= warmup and residual is not None and total < threshold
                acc = total if use else 0.0
            prev = probe
            if use:
                h = h + residual
            else:
                start = h
                for block in model.blocks:
                    h = block(h, c)
                residual = h - start
            reused.append(use)
            outs.append(_final(model, h, c))
    return outs, reused


@pytest.mark.parametrize("threshold", [0.2, 0.6])
def test_teacache_matches_hand_written_loop(threshold):
    model, inputs, n_blocks = FAMILIES["tiny_dit"]()
    coefficients = (0.5, 0.02)
    expected, reused = reference_teacache(model, inputs, threshold, coefficients, warmup=1)
    cached = adacache.compile(model, adacache.TeaCache(threshold, coefficients=coefficients), example_inputs=((), inputs(TIMESTEPS[0])))
    counts = run_against_reference(cached, inputs, TIMESTEPS, expected)
    assert [r["reused"]["site_0"] for r in adacache.summary(cached).per_step] == reused
    assert counts == [0 if r else n_blocks for r in reused]
    if threshold == 0.6:
        assert sum(reused) >= 2


def test_calibration_fits_output_change_from_input_change():
    model, inputs, _ = FAMILIES["diffusers_dit"]()
    fitted = adacache.calibrate(model, adacache.TeaCache(0.3), lambda d: denoise(d, inputs, steps=12), degree=2)
    assert len(fitted.coefficients) == 3 and fitted.coefficients != (1.0, 0.0)
    assert fitted.threshold == 0.3
    cached = adacache.compile(model, fitted)
    denoise(cached, inputs, steps=12)
    assert adacache.summary(cached).calls == 12
    with pytest.raises(adacache.PolicyError, match="step pairs"):
        adacache.calibrate(model, adacache.TeaCache(0.3), lambda d: denoise(d, inputs, steps=3), degree=4)


def test_teacache_needs_an_attention_to_probe():
    with pytest.raises(ValueError, match="threshold"):
        adacache.TeaCache(threshold=0)
    with pytest.raises(ValueError, match="coefficients"):
        adacache.TeaCache(coefficients=())


def test_teacache_exports_to_onnx(tmp_path):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, adacache.TeaCache(0.6, coefficients=(0.5, 0.02)))
    engine = assert_onnx_matches_eager(cached, inputs, TIMESTEPS, tmp_path / "tea")
    assert engine.reused["site_0"] == adacache.summary(cached).sites[0].reused >= 2


def test_adacorrection_over_teacache_exports_to_onnx(tmp_path):
    """Its first unit emits two scores (the gate's and the offset's): both were named
    signal__site_0__score, and torch.onnx.export refused the duplicate output name."""
    model, inputs, _ = FAMILIES["tiny_dit"]()
    policy = adacache.AdaCorrection(base=adacache.TeaCache(0.6, coefficients=(0.5, 0.02)), veto=0.5)
    cached = adacache.compile(model, policy)
    engine = assert_onnx_matches_eager(cached, inputs, TIMESTEPS, tmp_path / "ada_tea")
    summary = adacache.summary(cached)
    assert [engine.reused[s.site] for s in summary.sites] == [s.reused for s in summary.sites]
    assert sum(engine.reused.values()) > 0
