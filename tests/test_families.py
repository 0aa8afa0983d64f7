"""End to end on tiny models of several diffusers families: skipping saves real work."""

from __future__ import annotations

import pytest
import torch

import adacache
from families import FAMILIES
from helpers import CountAttention, denoise, output_tensor


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fora_skips_every_block_on_reuse_steps(name):
    model, inputs, n_blocks = FAMILIES[name]()
    with CountAttention() as full, torch.no_grad():
        model(**inputs(torch.tensor(900.0)))
    per_call = full.count
    cached = adacache.compile(model, adacache.FORA(interval=2), example_inputs=((), inputs(torch.tensor(900.0))))
    counts, outs = [], []
    cached.adacache.new_request()
    with torch.no_grad():
        for t in torch.linspace(900, 100, 4):
            with CountAttention() as counter:
                outs.append(output_tensor(cached(**inputs(t))))
            counts.append(counter.count)
    assert counts == [per_call, 0, per_call, 0]
    reference = denoise(model, inputs, steps=1)
    assert torch.allclose(outs[0], output_tensor(model(**inputs(torch.tensor(900.0)))), atol=1e-5)
    assert all(torch.isfinite(o).all() for o in outs)
    assert reference[0].shape == outs[0].shape
    summary = adacache.summary(cached)
    assert summary.hit_rate == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["flux", "sd3", "wan"])
def test_module_granularity_recomputes_norms_and_caches_attention(name):
    model, inputs, _ = FAMILIES[name]()
    cached = adacache.compile(model, adacache.FORA(interval=2, granularity="module"))
    steps = denoise(cached, inputs, steps=4)
    reference = denoise(model, inputs, steps=4)
    assert torch.allclose(steps[0], reference[0], atol=1e-5)
    assert not torch.allclose(steps[1], reference[1], atol=1e-6), "step 1 reused attention outputs"
    labels = [s.label for s in cached.adacache.programs[0].layout.sites]
    assert all(label.rsplit(".", 1)[1] in {"attn", "attn1", "attn2", "ff", "ff_context", "ffn"} for label in labels)


@pytest.mark.parametrize("name", ["diffusers_dit", "pixart", "sd3", "flux", "wan"])
def test_first_block_cache_runs_on_each_family(name):
    model, inputs, _ = FAMILIES[name]()
    cached = adacache.compile(model, adacache.FirstBlockCache(10.0))
    outs = denoise(cached, inputs, steps=4)
    summary = adacache.summary(cached)
    assert summary.sites[1].reused >= 1, "a loose threshold must reuse the cached span"
    assert all(torch.isfinite(o).all() for o in outs)
