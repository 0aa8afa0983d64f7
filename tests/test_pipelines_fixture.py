"""The tiny offline pipelines of tests/pipelines.py: reproducible, seed-dependent, finite."""

from __future__ import annotations

import pytest
import torch

from pipelines import PIPELINES, TinyPipeline, run

# Output of one call with the builder's own `call` (batch 1). Latent layouts differ by family:
# Flux and Qwen-Image pack 2x2 latent patches into tokens, LTX packs every latent pixel, and
# CogVideoX puts frames before channels.
EXPECTED_SHAPES = {
    "dit": (1, 3, 16, 16),              # decoded image in [0, 1]: DiTPipeline has no latent output
    "pixart_alpha": (1, 4, 8, 8),
    "pixart_sigma": (1, 4, 8, 8),
    "sd3": (1, 4, 8, 8),
    "flux": (1, 16, 16),                # (batch, 4x4 tokens, 4 channels * 2x2)
    "wan": (1, 4, 3, 8, 8),             # (batch, channels, latent frames, h, w)
    "cogvideox": (1, 3, 4, 8, 8),       # (batch, latent frames, channels, h, w)
    "ltx": (1, 3 * 8 * 8, 4),           # (batch, frames * h * w tokens, channels)
    "hunyuan_video": (1, 4, 3, 8, 8),
    "qwenimage": (1, 16, 16),
    "sana": (1, 4, 8, 8),
    "lumina2": (1, 4, 8, 8),
    "cogview4": (1, 4, 8, 8),
    "aura_flow": (1, 4, 8, 8),
    "wan22": (1, 4, 3, 8, 8),
    "flux_img2img": (1, 16, 16),
}


def test_every_builder_has_an_expected_shape():
    assert set(EXPECTED_SHAPES) == set(PIPELINES)


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def tiny(request) -> TinyPipeline:
    return PIPELINES[request.param]()


def test_same_seed_same_output_other_seed_other_output(tiny: TinyPipeline):
    first, again, other = run(tiny, seed=0), run(tiny, seed=0), run(tiny, seed=1)

    assert first.shape == EXPECTED_SHAPES[tiny.name]
    assert first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_call_is_a_fast_guided_call_without_generator(tiny: TinyPipeline):
    assert "generator" not in tiny.call
    assert tiny.call["num_inference_steps"] <= 4
    assert tiny.call["output_type"] == ("pt" if tiny.name == "dit" else "latent")
    guidance = tiny.call.get("true_cfg_scale", tiny.call.get("guidance_scale"))
    assert guidance is not None and guidance > 1
    for name in tiny.denoisers:
        denoiser = getattr(tiny.pipe, name)
        assert not denoiser.training
        assert next(denoiser.parameters()).dtype == torch.float32


def test_denoiser_weights_are_not_left_at_zero(tiny: TinyPipeline):
    """diffusers zero-initialises adaLN-Zero and output layers; the builders re-randomise them."""
    for name in tiny.denoisers:
        zero = [n for n, p in getattr(tiny.pipe, name).named_parameters() if not p.detach().any()]
        assert zero == []


def test_the_two_wan22_experts_differ():
    tp = PIPELINES["wan22"]()
    assert tp.denoisers == ("transformer", "transformer_2")
    first = next(tp.pipe.transformer.parameters())
    second = next(tp.pipe.transformer_2.parameters())
    assert not torch.equal(first, second)


def test_txt2img_image_feeds_img2img():
    txt2img, img2img = PIPELINES["flux"](), PIPELINES["flux_img2img"]()
    image = run(txt2img, seed=0, output_type="pt")
    assert image.shape == (1, 3, 16, 16)
    edited = run(img2img, seed=0, image=image)
    assert edited.shape == EXPECTED_SHAPES["flux_img2img"]
    assert torch.isfinite(edited).all()
    assert not torch.allclose(edited, run(img2img, seed=0))  # the input image matters
