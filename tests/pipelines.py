"""Tiny, randomly initialised, fully offline diffusers pipelines of many DiT families.

Each builder in ``PIPELINES`` returns a :class:`TinyPipeline`: a real diffusers pipeline
(text encoders, tokenizers, VAE, scheduler and transformer) whose every component is built
from a config with tiny sizes, so that a whole generation takes a fraction of a second on a
CPU. Nothing is downloaded: text encoders come from their ``transformers`` config classes and
tokenizers are byte-level tokenizers built with the ``tokenizers`` library.

Builders are deterministic (the global RNG is seeded before each component), and the
denoisers' weights are re-randomised after construction: diffusers zero-initialises the
adaLN-Zero and output layers, which would make every block an identity and caching trivially
exact.

    tp = PIPELINES["flux"]()
    latents = run(tp, seed=0)                        # fresh generator each call
    tp.pipe.transformer = some_wrapper(tp.pipe.transformer)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# Nothing here may reach the hub; fail loudly instead of hanging on a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class TinyPipeline:
    """A tiny pipeline and the keyword arguments of a fast, guided call to it.

    ``call`` never holds a ``generator``: :func:`run` adds a freshly seeded one, so that
    repeated calls are reproducible. ``denoisers`` names the pipeline attributes that hold the
    diffusion transformers (the modules a caching compiler would wrap).
    """

    name: str
    pipe: DiffusionPipeline  # on CPU, eval, float32, progress bar disabled
    call: dict[str, Any]
    denoisers: tuple[str, ...] = ("transformer",)


@functools.cache
def shared(name: str) -> TinyPipeline:
    """``PIPELINES[name]()`` built once per process, for tests that do not change the pipeline
    (tests that load LoRA, set processors or convert dtypes build their own)."""
    return PIPELINES[name]()


def run(tp: TinyPipeline, seed: int = 0, **overrides: Any) -> torch.Tensor:
    """Call ``tp.pipe(**tp.call, **overrides)`` with a fresh ``torch.Generator().manual_seed(seed)``
    and return its output (latents, images or frames) as a float32 tensor."""
    kwargs = {**tp.call, **overrides, "generator": torch.Generator().manual_seed(seed), "return_dict": False}
    with torch.no_grad():
        output = tp.pipe(**kwargs)[0]
    if not isinstance(output, torch.Tensor):  # "np" output types
        output = torch.from_numpy(output)
    return output.float()


# --------------------------------------------------------------------------------------------
# Shared pieces


# Every tokenizer below is byte-level: any prompt maps to distinct ids without a vocabulary
# file. The ids of the special tokens are the same for all of them, and the text encoders'
# configs are given the same ids.
PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>", "<s>")
VOCAB_SIZE = 264  # 4 special tokens + 256 byte symbols, rounded up


def byte_tokenizer(prepend_bos: bool = False, append_eos: bool = False, model_max_length: int = 77):
    """A byte-level BPE tokenizer without merges (one token per UTF-8 byte), wrapped in
    ``transformers.PreTrainedTokenizerFast``; ``prepend_bos``/``append_eos`` add ``<s>``/``</s>``
    around each sequence, as the CLIP/T5/Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate((*_SPECIAL_TOKENS, *byte_symbols))}
    assert len(vocab) <= VOCAB_SIZE
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    template = " ".join([*(["<s>"] if prepend_bos else []), "$A", *(["</s>"] if append_eos else [])])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=model_max_length,
        pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>",
    )


def randomize_weights(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with small random values, so that no layer is an identity.

    Matrices get unit-variance inputs to unit-variance outputs (std 1/sqrt(fan_in)); norm
    scales stay near one; other vectors (biases, learned tokens) get std 0.02.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() > 1:
                p.copy_(noise / (p[0].numel() ** 0.5))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)
    return module


def _seeded(build: Callable[[], Any]) -> Any:
    """Build one component right after seeding the global RNG (transformers and diffusers
    initialise their weights from it)."""
    torch.manual_seed(0)
    return build()


def _denoiser(build: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    return randomize_weights(_seeded(build), seed)


def _finish(pipe: Any) -> Any:
    """CPU, float32, eval mode, no progress bar."""
    pipe.to("cpu")
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _kl_vae(latent_channels: int = 4, levels: int = 2, **config: Any):
    """AutoencoderKL with ``levels`` 8-channel levels: spatial compression 2 ** (levels - 1)."""
    from diffusers import AutoencoderKL

    return _seeded(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8,) * levels, layers_per_block=1, norm_num_groups=4, sample_size=16, **config,
    ))


def _t5(d_model: int = 16):
    from transformers import T5Config, T5EncoderModel

    return _seeded(lambda: T5EncoderModel(T5Config(
        vocab_size=VOCAB_SIZE, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID,
    )))


def _clip(hidden_size: int = 16, projection_dim: int | None = None):
    """CLIPTextModel, or CLIPTextModelWithProjection when ``projection_dim`` is given."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim or hidden_size,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return _seeded(lambda: cls(config))


# --------------------------------------------------------------------------------------------
# Builders, one per family


# DiT and PixArt are epsilon-prediction models. With random weights the predicted noise is
# uncorrelated with the true one, and epsilon -> x0 divides that error by sqrt(alpha_bar)
# (about 1/150 at t=999 with their linear betas): latents grow to hundreds over four steps.
# Their schedulers are run in v-prediction instead, which keeps x0 = O(1); the transformer
# calls are exactly the same.
_EPS_FREE = "v_prediction"


def dit() -> TinyPipeline:
    """DiT, class-conditional with CFG (null class 1000); images decoded by the VAE."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = _denoiser(lambda: DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
    ))
    pipe = DiTPipeline(transformer=transformer, vae=_kl_vae(), scheduler=DDIMScheduler(prediction_type=_EPS_FREE))
    # The pipeline has no latent output: it always decodes (to [0, 1] images).
    call = dict(class_labels=[3], num_inference_steps=4, guidance_scale=4.0, output_type="pt")
    return TinyPipeline("dit", _finish(pipe), call)


def _pixart(sigma: bool) -> TinyPipeline:
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = _denoiser(lambda: PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16,
        interpolation_scale=1 if not sigma else 2, use_additional_conditions=False,
    ))
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(
        tokenizer=byte_tokenizer(append_eos=True, model_max_length=16), text_encoder=_t5(16),
        vae=_kl_vae(), transformer=transformer, scheduler=DPMSolverMultistepScheduler(prediction_type=_EPS_FREE),
    )
    call = dict(
        prompt="a red cat", negative_prompt="", num_inference_steps=4, guidance_scale=4.5,
        height=16, width=16, max_sequence_length=16, clean_caption=False,
        use_resolution_binning=False, output_type="latent",
    )
    return TinyPipeline("pixart_sigma" if sigma else "pixart_alpha", _finish(pipe), call)


def pixart_alpha() -> TinyPipeline:
    """PixArt-alpha: cross-attention DiT with adaLN-single, T5 text encoder, DPM-Solver."""
    return _pixart(sigma=False)


def pixart_sigma() -> TinyPipeline:
    """PixArt-Sigma: the PixArt-alpha architecture with the Sigma pipeline."""
    return _pixart(sigma=True)


def sd3() -> TinyPipeline:
    """Stable Diffusion 3: MMDiT with two CLIP encoders and a T5 encoder, CFG."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = _denoiser(lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        # joint_attention_dim: the CLIP pair (16 + 16) is zero-padded to the T5 width (32).
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16,
    ))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_kl_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(16, projection_dim=16), tokenizer=byte_tokenizer(True, True),
        text_encoder_2=_clip(16, projection_dim=16), tokenizer_2=byte_tokenizer(True, True),
        text_encoder_3=_t5(32), tokenizer_3=byte_tokenizer(append_eos=True, model_max_length=16),
    )
    call = dict(prompt="a red cat", num_inference_steps=4, guidance_scale=5.0, height=16, width=16,
                max_sequence_length=16, output_type="latent")
    return TinyPipeline("sd3", _finish(pipe), call)


def _flux_components() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    transformer = _denoiser(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ))
    return dict(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_kl_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=_clip(16), tokenizer=byte_tokenizer(True, True),
        text_encoder_2=_t5(16), tokenizer_2=byte_tokenizer(append_eos=True, model_max_length=16),
    )


_FLUX_CALL = dict(prompt="a red cat", num_inference_steps=4, guidance_scale=3.5, height=16, width=16,
                  max_sequence_length=16, output_type="latent")


def flux() -> TinyPipeline:
    """Flux.1-dev style: MMDiT + single-stream blocks, guidance-distilled (guidance embedding, no
    CFG batch). Output: packed latents (batch, tokens, 4 * channels)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**_flux_components())
    return TinyPipeline("flux", _finish(pipe), dict(_FLUX_CALL))


def flux_img2img() -> TinyPipeline:
    """Flux img2img: the Flux components, starting from a fixed 16x16 RGB image at strength 0.75
    (override ``image`` with a txt2img output to chain the two)."""
    from diffusers import FluxImg2ImgPipeline

    pipe = FluxImg2ImgPipeline(**_flux_components())
    image = torch.linspace(0, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
    call = {**_FLUX_CALL, "image": image, "strength": 0.75}
    return TinyPipeline("flux_img2img", _finish(pipe), call)


def _wan_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    return _denoiser(lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ), seed)


def _wan(two_experts: bool) -> TinyPipeline:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    vae = _seeded(lambda: AutoencoderKLWan(
        base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ))
    extra = dict(transformer_2=_wan_transformer(seed=1), boundary_ratio=0.875) if two_experts else {}
    pipe = WanPipeline(
        tokenizer=byte_tokenizer(append_eos=True, model_max_length=16), text_encoder=_t5(16), vae=vae,
        transformer=_wan_transformer(seed=0),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        **extra,
    )
    # 9 frames -> 3 latent frames of 8x8 (VAE: 4x in time, 8x in space).
    call = dict(prompt="a red cat", negative_prompt="", num_inference_steps=4, guidance_scale=5.0,
                height=64, width=64, num_frames=9, max_sequence_length=16, output_type="latent")
    if two_experts:
        call["guidance_scale_2"] = 3.0
    name = "wan22" if two_experts else "wan"
    return TinyPipeline(name, _finish(pipe), call, ("transformer", "transformer_2") if two_experts else ("transformer",))


def wan() -> TinyPipeline:
    """Wan 2.1: video DiT with cross-attention to T5, UniPC flow scheduler, CFG."""
    return _wan(two_experts=False)


def wan22() -> TinyPipeline:
    """Wan 2.2 style: two experts, ``transformer`` for high noise (t >= 875) and
    ``transformer_2`` for low noise, each with its own guidance scale."""
    return _wan(two_experts=True)


def cogvideox() -> TinyPipeline:
    """CogVideoX: expert-adaLN joint-attention video DiT, T5 text encoder, v-prediction DDIM."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    transformer = _denoiser(lambda: CogVideoXTransformer3DModel(
        # heads * head_dim must be divisible by 16 for the 3D sin-cos position embedding.
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16,
    ))
    vae = _seeded(lambda: AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ))
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", beta_end=0.012, prediction_type="v_prediction",
        rescale_betas_zero_snr=True, timestep_spacing="trailing", snr_shift_scale=3.0,
        clip_sample=False, set_alpha_to_one=True,
    )
    pipe = CogVideoXPipeline(
        tokenizer=byte_tokenizer(append_eos=True, model_max_length=16), text_encoder=_t5(16),
        vae=vae, transformer=transformer, scheduler=scheduler,
    )
    # 9 frames -> 3 latent frames of 8x8; max_sequence_length must equal max_text_seq_length.
    call = dict(prompt="a red cat", negative_prompt="", num_inference_steps=4, guidance_scale=6.0,
                height=64, width=64, num_frames=9, max_sequence_length=16, output_type="latent")
    return TinyPipeline("cogvideox", _finish(pipe), call)


def ltx() -> TinyPipeline:
    """LTX-Video: video DiT with cross-attention to T5, flow matching, CFG. Output: packed
    latents (batch, tokens, channels)."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    transformer = _denoiser(lambda: LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=16,
    ))
    vae = _seeded(lambda: AutoencoderKLLTXVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ))
    pipe = LTXPipeline(
        tokenizer=byte_tokenizer(append_eos=True, model_max_length=16), text_encoder=_t5(16),
        vae=vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    # VAE: 4x in time and space: 9 frames of 32x32 -> 3 latent frames of 8x8.
    call = dict(prompt="a red cat", negative_prompt="", num_inference_steps=4, guidance_scale=3.0,
                height=32, width=32, num_frames=9, max_sequence_length=16, output_type="latent")
    return TinyPipeline("ltx", _finish(pipe), call)


def hunyuan_video() -> TinyPipeline:
    """HunyuanVideo: dual- and single-stream video DiT with a token refiner, Llama + CLIP text
    encoders, guidance-distilled (guidance embedding, no CFG batch)."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import LlamaConfig, LlamaModel

    transformer = _denoiser(lambda: HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=16, rope_axes_dim=(2, 2, 4),
    ))
    vae = _seeded(lambda: AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=False,
    ))
    llama = _seeded(lambda: LlamaModel(LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )))
    pipe = HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=byte_tokenizer(prepend_bos=True, model_max_length=16),
        text_encoder_2=_clip(16), tokenizer_2=byte_tokenizer(True, True),
        vae=vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    # The default prompt template is ~95 tokens of chat preamble; a bare template keeps it tiny.
    call = dict(prompt="a red cat", prompt_template={"template": "{}", "crop_start": 0}, num_inference_steps=4,
                guidance_scale=6.0, height=64, width=64, num_frames=9, max_sequence_length=16,
                output_type="latent")
    return TinyPipeline("hunyuan_video", _finish(pipe), call)


def qwenimage() -> TinyPipeline:
    """Qwen-Image: MMDiT with a Qwen2.5-VL text encoder, true CFG with a negative prompt.
    Output: packed latents (batch, tokens, 4 * channels)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformer = _denoiser(lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    ))
    vae = _seeded(lambda: AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ))
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, rope_theta=1e6,
            rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        vocab_size=VOCAB_SIZE, hidden_size=16,
        # Vision placeholder ids out of the way of the byte tokens (no images are passed).
        image_token_id=VOCAB_SIZE - 1, video_token_id=VOCAB_SIZE - 2,
        vision_start_token_id=VOCAB_SIZE - 3, vision_end_token_id=VOCAB_SIZE - 4,
    )
    text_encoder = _seeded(lambda: Qwen2_5_VLForConditionalGeneration(config))
    tokenizer = byte_tokenizer(model_max_length=1024)
    pipe = QwenImagePipeline(
        tokenizer=tokenizer, text_encoder=text_encoder,
        vae=vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    # The pipeline drops the chat preamble of its prompt template by a token count (34) that
    # is right for the Qwen tokenizer only; count it in this tokenizer's bytes instead, or the
    # kept embeddings would be preamble and the prompt would have no effect.
    preamble = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(preamble).input_ids)
    # VAE 4x, then 2x2 packing: 32x32 -> 8x8 latents -> 16 tokens.
    call = dict(prompt="a red cat", negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=4,
                height=32, width=32, max_sequence_length=16, output_type="latent")
    return TinyPipeline("qwenimage", _finish(pipe), call)


def sana() -> TinyPipeline:
    """Sana: linear-attention DiT with cross-attention to a Gemma-2 encoder, deep-compression
    VAE, CFG."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    transformer = _denoiser(lambda: SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=1,
    ))
    vae = _seeded(lambda: AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    ))
    gemma = _seeded(lambda: Gemma2Model(Gemma2Config(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )))
    pipe = SanaPipeline(
        tokenizer=byte_tokenizer(prepend_bos=True, model_max_length=16), text_encoder=gemma,
        vae=vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    # Sana wants sizes divisible by 32: 32x32 -> 8x8 latents (VAE 4x).
    # complex_human_instruction=None: the default prepends ~700 characters of instructions.
    call = dict(prompt="a red cat", negative_prompt="", num_inference_steps=4, guidance_scale=4.5, height=32,
                width=32, max_sequence_length=16, complex_human_instruction=None, use_resolution_binning=False,
                output_type="latent")
    return TinyPipeline("sana", _finish(pipe), call)


def lumina2() -> TinyPipeline:
    """Lumina-Image 2.0: unified next-DiT with caption/noise refiners, Gemma-2 encoder, CFG."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    transformer = _denoiser(lambda: Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 2, 2),
        axes_lens=(64, 16, 16), cap_feat_dim=16,
    ))
    gemma = _seeded(lambda: Gemma2Model(Gemma2Config(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )))
    pipe = Lumina2Pipeline(
        tokenizer=byte_tokenizer(prepend_bos=True, model_max_length=32), text_encoder=gemma,
        vae=_kl_vae(levels=4, shift_factor=0.0609, scaling_factor=1.5035),
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    # The pipeline hard-codes VAE compression 8 (hence the 4-level VAE): 64x64 -> 8x8 latents.
    # An empty system prompt: the default one is ~150 bytes and would fill the whole sequence.
    call = dict(prompt="a red cat", negative_prompt="", system_prompt="", num_inference_steps=4,
                guidance_scale=4.0, height=64, width=64, max_sequence_length=32, output_type="latent")
    return TinyPipeline("lumina2", _finish(pipe), call)


def cogview4() -> TinyPipeline:
    """CogView4: joint-attention DiT with a GLM text encoder, dynamic-shift flow matching, CFG."""
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    transformer = _denoiser(lambda: CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=8, condition_dim=4, rope_axes_dim=(4, 4),
    ))
    glm = _seeded(lambda: GlmModel(GlmConfig(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
    )))
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear",
    )
    pipe = CogView4Pipeline(
        # <s> stands in for GLM's "[gMASK]<sop>" prefix: an empty negative prompt must not be 0 tokens.
        tokenizer=byte_tokenizer(prepend_bos=True, model_max_length=16), text_encoder=glm, vae=_kl_vae(),
        transformer=transformer, scheduler=scheduler,
    )
    call = dict(prompt="a red cat", negative_prompt="", num_inference_steps=4, guidance_scale=5.0, height=16,
                width=16, max_sequence_length=16, output_type="latent")
    return TinyPipeline("cogview4", _finish(pipe), call)


def aura_flow() -> TinyPipeline:
    """AuraFlow: MMDiT + single DiT blocks with a UMT5 text encoder, flow matching, CFG."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    transformer = _denoiser(lambda: AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64,
    ))
    umt5 = _seeded(lambda: UMT5EncoderModel(UMT5Config(
        vocab_size=VOCAB_SIZE, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID,
    )))
    pipe = AuraFlowPipeline(
        tokenizer=byte_tokenizer(append_eos=True, model_max_length=16), text_encoder=umt5, vae=_kl_vae(),
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    call = dict(prompt="a red cat", negative_prompt="", num_inference_steps=4, guidance_scale=3.5, height=16,
                width=16, max_sequence_length=16, output_type="latent")
    return TinyPipeline("aura_flow", _finish(pipe), call)


PIPELINES: dict[str, Callable[[], TinyPipeline]] = {
    "dit": dit,
    "pixart_alpha": pixart_alpha,
    "pixart_sigma": pixart_sigma,
    "sd3": sd3,
    "flux": flux,
    "wan": wan,
    "cogvideox": cogvideox,
    "ltx": ltx,
    "hunyuan_video": hunyuan_video,
    "qwenimage": qwenimage,
    "sana": sana,
    "lumina2": lumina2,
    "cogview4": cogview4,
    "aura_flow": aura_flow,
    # Extra variants: two denoisers, and an image-to-image pipeline.
    "wan22": wan22,
    "flux_img2img": flux_img2img,
}
