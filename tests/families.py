"""Tiny, randomly initialised models of several DiT families, with inputs to call them.

Each builder returns ``(model, kwargs_for_step(t), expected_block_count)``. Sizes are
chosen so that a forward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from adacache.models import DiT, DiTConfig, init_dit_weights

Builder = Callable[[], tuple[torch.nn.Module, Callable[[torch.Tensor], dict[str, Any]], int]]


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised (adaLN-Zero, output) layers random values: caching an identity
    block would be trivially exact."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def tiny_dit() -> tuple[torch.nn.Module, Callable, int]:
    model = init_dit_weights(DiT(DiTConfig.tiny())).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    y = torch.tensor([3, 10])
    return model, lambda t: dict(x=x, timestep=t.expand(2), class_labels=y), 4


def diffusers_dit() -> tuple[torch.nn.Module, Callable, int]:
    from diffusers import DiTTransformer2DModel

    model = _randomize(DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
    ))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    y = torch.tensor([1, 1000])
    return model, lambda t: dict(hidden_states=x, timestep=t.expand(2), class_labels=y), 3


def pixart() -> tuple[torch.nn.Module, Callable, int]:
    from diffusers import PixArtTransformer2DModel

    model = _randomize(PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
        cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=24,
        interpolation_scale=1, use_additional_conditions=False,
    ))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    text = torch.randn(2, 5, 24, generator=gen)
    return model, lambda t: dict(hidden_states=x, encoder_hidden_states=text, timestep=t.expand(2)), 3


def sd3() -> tuple[torch.nn.Module, Callable, int]:
    from diffusers import SD3Transformer2DModel

    model = _randomize(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16,
    ))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    text = torch.randn(2, 7, 24, generator=gen)
    pooled = torch.randn(2, 12, generator=gen)
    return model, lambda t: dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t.expand(2)), 3


def flux() -> tuple[torch.nn.Module, Callable, int]:
    from diffusers import FluxTransformer2DModel

    model = _randomize(FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(2, 2, 4),
    ))
    gen = torch.Generator().manual_seed(1)
    img_tokens, txt_tokens = 16, 5
    x = torch.randn(1, img_tokens, 8, generator=gen)
    text = torch.randn(1, txt_tokens, 24, generator=gen)
    pooled = torch.randn(1, 12, generator=gen)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 3)
    txt_ids = torch.zeros(txt_tokens, 3)

    def inputs(t: torch.Tensor) -> dict[str, Any]:
        return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                    timestep=(t / 1000).expand(1), img_ids=img_ids, txt_ids=txt_ids)

    return model, inputs, 4


def wan() -> tuple[torch.nn.Module, Callable, int]:
    from diffusers import WanTransformer3DModel

    model = _randomize(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
    ))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 8, 8, generator=gen)
    text = torch.randn(1, 6, 24, generator=gen)
    return model, lambda t: dict(hidden_states=x, encoder_hidden_states=text, timestep=t.expand(1)), 3


FAMILIES: dict[str, Builder] = {
    "tiny_dit": tiny_dit,
    "diffusers_dit": diffusers_dit,
    "pixart": pixart,
    "sd3": sd3,
    "flux": flux,
    "wan": wan,
}
