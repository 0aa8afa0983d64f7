"""Tiny random-weight diffusers transformers of the families ``tests/pipelines.py`` does not
build as pipelines: each a shape of model a user may bring.

Each builder returns ``(model, inputs(t))``; ``inputs`` gives the keyword inputs of one call
at timestep ``t`` (a 0-d float tensor in [0, 1000]), in the dtype the model takes. Sizes are
the smallest the model's configuration accepts, so a call takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Inputs = Callable[[torch.Tensor], dict[str, Any]]


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _build(cls_name: str, **config: Any) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    model = getattr(diffusers, cls_name)(**config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised gates and outputs would make every block the identity
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5 if p.dim() > 1 else 20.0))
    return model


def _steps(batch: int, integer: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.expand(batch).to(torch.int64 if integer else torch.float32)


def allegro() -> tuple[torch.nn.Module, Inputs]:
    model = _build("AllegroTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                   num_layers=2, cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8)
    x, text, step = _random(2, 4, 2, 8, 8), _random(2, 6, 8, seed=1), _steps(2, integer=True)
    return model, lambda t: dict(hidden_states=x, encoder_hidden_states=text, timestep=step(t))


def _flux_like_inputs(batch_ids: bool) -> Inputs:
    x, text = _random(1, 16, 4), _random(1, 8, 32, seed=1)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3)
    txt_ids = torch.zeros(8, 3)
    if batch_ids:
        img_ids = torch.cat([img_ids, torch.zeros(16, 1)], -1)[None].long()
        txt_ids = torch.zeros(1, 8, 4, dtype=torch.long)
    step = _steps(1)
    return lambda t: dict(hidden_states=x, encoder_hidden_states=text, img_ids=img_ids, txt_ids=txt_ids, timestep=step(t) / 1000)


def bria() -> tuple[torch.nn.Module, Inputs]:
    model = _build("BriaTransformer2DModel", patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4])
    return model, _flux_like_inputs(batch_ids=False)


def chroma() -> tuple[torch.nn.Module, Inputs]:
    model = _build("ChromaTransformer2DModel", patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_num_channels=8,
                   approximator_hidden_dim=16, approximator_layers=1)
    return model, _flux_like_inputs(batch_ids=False)


def flux2() -> tuple[torch.nn.Module, Inputs]:
    model = _build("Flux2Transformer2DModel", patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4])
    base = _flux_like_inputs(batch_ids=True)
    return model, lambda t: dict(base(t), guidance=torch.full((1,), 3.5))


def cogview3plus() -> tuple[torch.nn.Module, Inputs]:
    model = _build("CogView3PlusTransformer2DModel", patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4,
                   num_attention_heads=2, out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=2,
                   pos_embed_max_size=8, sample_size=8)
    x, text, step = _random(2, 4, 8, 8), _random(2, 8, 8, seed=1), _steps(2, integer=True)
    size = torch.tensor([[64, 64]] * 2)
    return model, lambda t: dict(hidden_states=x, encoder_hidden_states=text, original_size=size, target_size=size,
                                 crop_coords=torch.zeros(2, 2, dtype=torch.long), timestep=step(t))


def easyanimate() -> tuple[torch.nn.Module, Inputs]:
    model = _build("EasyAnimateTransformer3DModel", attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2,
                   num_layers=2, out_channels=4, patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16,
                   time_embed_dim=8, time_position_encoding_type="3d_rope", timestep_activation_fn="silu")
    x, text, step = _random(2, 4, 2, 8, 8), _random(2, 6, 16, seed=1), _steps(2, integer=True)
    return model, lambda t: dict(hidden_states=x, encoder_hidden_states=text, timestep=step(t))


def hidream() -> tuple[torch.nn.Module, Inputs]:
    model = _build("HiDreamImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                   num_single_layers=1, attention_head_dim=8, num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8,
                   num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16),
                   llama_layers=(0, 1))
    x, t5, llama, pooled = _random(2, 4, 16, 16), _random(2, 8, 8, seed=1), _random(2, 2, 8, 4, seed=2), _random(2, 8, seed=3)
    step = _steps(2, integer=True)
    return model, lambda t: dict(hidden_states=x, encoder_hidden_states_t5=t5, encoder_hidden_states_llama3=llama,
                                 pooled_embeds=pooled, timesteps=step(t))


def hunyuan_dit() -> tuple[torch.nn.Module, Inputs]:
    model = _build("HunyuanDiT2DModel", sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                   num_attention_heads=2, cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4,
                   hidden_size=16, text_len=4, text_len_t5=4, activation_fn="gelu-approximate")
    x, text, t5 = _random(2, 4, 8, 8), _random(2, 4, 8, seed=1), _random(2, 4, 8, seed=2)
    angles = torch.arange(16.0)[:, None] * torch.arange(1.0, 9.0)[None] / 16  # one rotation per token and channel
    rotary = (angles.cos(), angles.sin())
    step = _steps(2)
    return model, lambda t: dict(hidden_states=x, encoder_hidden_states=text, text_embedding_mask=torch.ones(2, 4),
                                 encoder_hidden_states_t5=t5, text_embedding_mask_t5=torch.ones(2, 4), timestep=step(t),
                                 image_meta_size=torch.tensor([[64.0, 64, 64, 64, 0, 0]] * 2),
                                 style=torch.zeros(2, dtype=torch.long), image_rotary_emb=rotary)


def hunyuan_video15() -> tuple[torch.nn.Module, Inputs]:
    model = _build("HunyuanVideo15Transformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                   num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
                   text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")
    x, text, text2 = _random(1, 4, 1, 8, 8), _random(1, 6, 16, seed=1), _random(1, 4, 8, seed=2)
    step = _steps(1)
    return model, lambda t: dict(hidden_states=x, timestep=step(t), encoder_hidden_states=text, encoder_hidden_states_2=text2,
                                 encoder_attention_mask=torch.ones(1, 6), encoder_attention_mask_2=torch.ones(1, 4),
                                 image_embeds=torch.zeros(1, 3, 12))


def hunyuan_video_framepack() -> tuple[torch.nn.Module, Inputs]:
    model = _build("HunyuanVideoFramepackTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
                   attention_head_dim=10, num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1,
                   guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
                   image_condition_type=None, has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True)
    x, text, image = _random(1, 4, 3, 4, 4), _random(1, 12, 16, seed=1), _random(1, 12, 16, seed=2)
    clean, history_2x, history_4x = _random(1, 4, 2, 4, 4, seed=3), _random(1, 4, 2, 4, 4, seed=4), _random(1, 4, 8, 4, 4, seed=5)
    step = _steps(1, integer=True)
    return model, lambda t: dict(
        hidden_states=x, timestep=step(t), encoder_hidden_states=text, pooled_projections=_random(1, 8, seed=6),
        encoder_attention_mask=torch.ones(1, 12), guidance=torch.full((1,), 6, dtype=torch.long), image_embeds=image,
        indices_latents=torch.arange(3.0), latents_clean=clean, indices_latents_clean=torch.arange(2.0),
        latents_history_2x=history_2x, indices_latents_history_2x=torch.arange(2.0),
        latents_history_4x=history_4x, indices_latents_history_4x=torch.arange(8.0),
    )


def latte() -> tuple[torch.nn.Module, Inputs]:
    model = _build("LatteTransformer3DModel", sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4, num_attention_heads=2,
                   caption_channels=8, in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True,
                   activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                   norm_elementwise_affine=False, norm_eps=1e-6)
    x, text, step = _random(2, 4, 1, 8, 8), _random(2, 8, 8, seed=1), _steps(2, integer=True)
    return model, lambda t: dict(hidden_states=x, encoder_hidden_states=text, timestep=step(t), enable_temporal_attentions=True)


def ltx2() -> tuple[torch.nn.Module, Inputs]:
    model = _build("LTX2VideoTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
                   attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
                   audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2,
                   qk_norm="rms_norm_across_heads", caption_channels=16, rope_double_precision=False)
    x, audio, text, audio_text = _random(2, 128, 4), _random(2, 9, 4, seed=1), _random(2, 8, 16, seed=2), _random(2, 8, 16, seed=3)
    step = _steps(2)
    return model, lambda t: dict(hidden_states=x, audio_hidden_states=audio, encoder_hidden_states=text,
                                 audio_encoder_hidden_states=audio_text, timestep=step(t) / 1000,
                                 encoder_attention_mask=torch.ones(2, 8, dtype=torch.bool), num_frames=2, height=8, width=8,
                                 audio_num_frames=9, fps=25.0)


def mochi() -> tuple[torch.nn.Module, Inputs]:
    model = _build("MochiTransformer3DModel", patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                   pooled_projection_dim=16, in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16,
                   time_embed_dim=4, activation_fn="swiglu", max_sequence_length=16)
    x, text, step = _random(2, 4, 2, 8, 8), _random(2, 16, 16, seed=1), _steps(2, integer=True)
    return model, lambda t: dict(hidden_states=x, encoder_hidden_states=text, timestep=step(t),
                                 encoder_attention_mask=torch.ones(2, 16, dtype=torch.bool))


def omnigen() -> tuple[torch.nn.Module, Inputs]:
    model = _build("OmniGenTransformer2DModel", hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32,
                   num_layers=3, pad_token_id=0, vocab_size=1000, in_channels=4, time_step_dim=4,
                   rope_scaling={"long_factor": [1, 2], "short_factor": [1, 2]})
    x, image, step = _random(2, 4, 8, 8), _random(1, 4, 8, 8, seed=1), _steps(2)
    ids = torch.randint(1, 1000, (2, 24), generator=torch.Generator().manual_seed(2))
    length = 24 + 1 + 16  # text, time token, image tokens
    return model, lambda t: dict(hidden_states=x, timestep=step(t) / 1000, input_ids=ids, input_img_latents=[image],
                                 input_image_sizes={0: [[0, 16]]}, attention_mask=torch.ones(2, length, length),
                                 position_ids=torch.arange(length).expand(2, length))


def skyreels_v2() -> tuple[torch.nn.Module, Inputs]:
    model = _build("SkyReelsV2Transformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                   in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    x, text, step = _random(1, 4, 2, 8, 8), _random(1, 12, 16, seed=1), _steps(1, integer=True)
    return model, lambda t: dict(hidden_states=x, encoder_hidden_states=text, timestep=step(t))


def wan_vace() -> tuple[torch.nn.Module, Inputs]:
    model = _build("WanVACETransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                   out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=4, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0, 2], vace_in_channels=48)
    x, text, control = _random(1, 16, 2, 8, 8), _random(1, 12, 32, seed=1), _random(1, 48, 2, 8, 8, seed=2)
    step = _steps(1, integer=True)
    return model, lambda t: dict(hidden_states=x, encoder_hidden_states=text, control_hidden_states=control, timestep=step(t))


def sana_video() -> tuple[torch.nn.Module, Inputs]:
    model = _build("SanaVideoTransformer3DModel", in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12,
                   num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24,
                   caption_channels=16, mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8, patch_size=(1, 2, 2),
                   norm_elementwise_affine=False, norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    x, text, step = _random(1, 16, 2, 8, 8), _random(1, 12, 16, seed=1), _steps(1, integer=True)
    return model, lambda t: dict(hidden_states=x, encoder_hidden_states=text, timestep=step(t))


#: name -> (builder, the capture mode ``capture="auto"`` ends in).
TRANSFORMERS: dict[str, tuple[Callable[[], tuple[torch.nn.Module, Inputs]], str]] = {
    "allegro": (allegro, "graph"),
    "bria": (bria, "graph"),
    "chroma": (chroma, "graph"),
    "cogview3plus": (cogview3plus, "graph"),
    "easyanimate": (easyanimate, "graph"),
    "flux2": (flux2, "graph"),
    "hidream": (hidream, "graph"),
    "hunyuan_dit": (hunyuan_dit, "graph"),
    "hunyuan_video15": (hunyuan_video15, "blocks"),  # `if is_t2v:` on a tensor's value
    "hunyuan_video_framepack": (hunyuan_video_framepack, "blocks"),  # block shapes depend on the history's values
    "latte": (latte, "graph"),
    "ltx2": (ltx2, "graph"),
    "mochi": (mochi, "graph"),
    "omnigen": (omnigen, "blocks"),  # its rotary embedding branches on torch.max(position_ids)
    "sana_video": (sana_video, "graph"),
    "skyreels_v2": (skyreels_v2, "graph"),
    "wan_vace": (wan_vace, "graph"),
}
