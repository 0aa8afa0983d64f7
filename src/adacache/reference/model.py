"""The reference class-conditional DiT for 16x16 digits, built from diffusers' ``DiTTransformer2DModel``.

Conditioning convention
-----------------------
diffusers' ``CombinedTimestepLabelEmbeddings`` (used by every adaLN-Zero block) is built with
``class_dropout_prob=0.1``, so its ``LabelEmbedding`` table has ``num_embeds_ada_norm + 1`` rows and the
extra row, index ``num_embeds_ada_norm`` (= :data:`NULL_CLASS` = 10 here), is the "no class" embedding
used for classifier-free guidance.

The built-in dropout draws an *independent* random mask in every block's embedder (and again for the
final layer's conditioning) whenever the module is in training mode, so one sample could be
"unconditional" in some blocks and conditional in others.  Training therefore switches that built-in
dropout off (:func:`disable_builtin_label_dropout`) and replaces labels by :data:`NULL_CLASS` itself,
once per sample, consistently for the whole network.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "NULL_CLASS",
    "NUM_CLASSES",
    "DEFAULT_DIT_CONFIG",
    "SCHEDULER_CONFIG",
    "build_dit",
    "build_scheduler",
    "disable_builtin_label_dropout",
    "init_dit_weights",
]

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # extra embedding row that diffusers adds for CFG

# 8 blocks (benchmarks downstream assume 8); d = heads * head_dim = 64 (d = 128 trained too slowly
# on one CPU core to give recognisable digits within the 60-minute budget, see assets/TRAINING.md).
DEFAULT_DIT_CONFIG: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 8,
    "dropout": 0.0,
    "attention_bias": True,
    "sample_size": 16,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": NUM_CLASSES,
    "upcast_attention": False,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}

# DiT-paper objective: epsilon prediction with the linear beta schedule of DDPM.
# clip_sample is off on purpose: with guidance 4 the guided epsilon implies x0 estimates far outside
# [-1, 1] at the first (very noisy) steps; clipping them while DDIM keeps the unclipped epsilon
# saturated the samples into bright blobs (measured: 23% vs 100% class accuracy on the same
# checkpoint).  The sampler clamps only the final images.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "leading",
}


def build_dit(**overrides: Any) -> nn.Module:
    """Create a freshly initialised reference DiT (adaLN-Zero initialisation, see :func:`init_dit_weights`).

    Args:
        **overrides: entries replacing those of :data:`DEFAULT_DIT_CONFIG`.

    Returns:
        A ``diffusers.DiTTransformer2DModel``.
    """
    from diffusers import DiTTransformer2DModel

    cfg = {**DEFAULT_DIT_CONFIG, **overrides}
    model = DiTTransformer2DModel(**cfg)
    init_dit_weights(model)
    return model


def build_scheduler(kind: str = "ddim") -> Any:
    """Return a diffusers scheduler with the reference noise schedule.

    Args:
        kind: ``"ddim"`` (sampling) or ``"ddpm"`` (training / ancestral sampling).
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddim":
        return DDIMScheduler(**SCHEDULER_CONFIG)
    if kind == "ddpm":
        cfg = {k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"}
        return DDPMScheduler(**cfg)
    raise ValueError(f"unknown scheduler kind {kind!r}")


def disable_builtin_label_dropout(model: nn.Module) -> None:
    """Switch off diffusers' per-embedder random label dropout (see module docstring for why).

    The embedding table keeps its null row, so :data:`NULL_CLASS` remains usable.
    """
    from diffusers.models.embeddings import LabelEmbedding

    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0


@torch.no_grad()
def init_dit_weights(model: nn.Module) -> None:
    """Initialise like the DiT paper: xavier linears, N(0, 0.02) embeddings, zeroed adaLN modulation and output.

    diffusers leaves PyTorch's default initialisation in place (it expects pretrained weights), so a
    model trained from scratch needs this to get the "-Zero" of adaLN-Zero: every residual block starts
    as the identity and the network output starts at zero.
    """
    from diffusers.models.embeddings import LabelEmbedding, TimestepEmbedding

    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    # Patch embedding: treat the conv like a linear layer (as in DiT).
    proj = model.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            nn.init.normal_(m.embedding_table.weight, std=0.02)
        elif isinstance(m, TimestepEmbedding):
            nn.init.normal_(m.linear_1.weight, std=0.02)
            nn.init.normal_(m.linear_2.weight, std=0.02)
    for block in model.transformer_blocks:
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for lin in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
