"""A small, self-contained adaLN-Zero DiT in the style of the original DiT (Peebles & Xie).

It needs no diffusers: tests and benchmarks use it as the plain-PyTorch reference model
family. ``DiT.forward(x, timestep, class_labels)`` predicts noise (and a variance channel
block when ``learn_sigma``), like DiT-S/2 and friends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class DiTConfig:
    """Shape of the network. ``DiTConfig.small()`` is DiT-S/2 on a 32x32x4 latent."""

    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True

    @classmethod
    def small(cls) -> "DiTConfig":
        """DiT-S/2: 12 blocks, hidden 384, 6 heads."""
        return cls()

    @classmethod
    def base(cls) -> "DiTConfig":
        """DiT-B/2: 12 blocks, hidden 768, 12 heads."""
        return cls(hidden_size=768, num_heads=12)

    @classmethod
    def xlarge(cls) -> "DiTConfig":
        """DiT-XL/2: 28 blocks, hidden 1152, 16 heads (the size of the released 256px model)."""
        return cls(hidden_size=1152, depth=28, num_heads=16)

    @classmethod
    def tiny(cls) -> "DiTConfig":
        """A test-sized model: 4 blocks, hidden 64, 8x8 input."""
        return cls(input_size=8, hidden_size=64, depth=4, num_heads=4, num_classes=10)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape ``[N, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding, shape ``[grid*grid, dim]``."""
    coords = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for pos in (yy.reshape(-1), xx.reshape(-1)):
        out = pos[:, None] * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    return torch.cat(parts, dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with fused QKV projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer feed-forward with tanh-GELU, as in DiT."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block: conditioning regresses shift/scale/gate of both sub-layers."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiT(nn.Module):
    """Class-conditional DiT. ``forward(x [N,C,H,W], timestep [N], class_labels [N])``."""

    def __init__(self, config: DiTConfig = DiTConfig()) -> None:
        super().__init__()
        self.config = config
        c = config
        self.out_channels = c.in_channels * 2 if c.learn_sigma else c.in_channels
        self.x_embedder = nn.Conv2d(c.in_channels, c.hidden_size, c.patch_size, c.patch_size)
        self.t_embedder = nn.Sequential(nn.Linear(256, c.hidden_size), nn.SiLU(), nn.Linear(c.hidden_size, c.hidden_size))
        self.y_embedder = nn.Embedding(c.num_classes + 1, c.hidden_size)  # last index: the CFG null class
        grid = c.input_size // c.patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(c.hidden_size, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.final_norm = nn.LayerNorm(c.hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden_size, 2 * c.hidden_size))
        self.final_linear = nn.Linear(c.hidden_size, c.patch_size * c.patch_size * self.out_channels)

    def unpatchify(self, x: Tensor) -> Tensor:
        p, c = self.config.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor) -> Tensor:
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(timestep_embedding(timestep, 256).to(x.dtype)) + self.y_embedder(class_labels)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        x = self.final_linear(modulate(self.final_norm(x), shift, scale))
        return self.unpatchify(x)


def init_dit_weights(model: DiT, seed: int = 0) -> DiT:
    """Deterministic random weights (N(0, 1/fan_in), zero biases) for tests and speed runs.

    Unlike adaLN-Zero's training init, the gates are not zero: a zero gate makes every block
    the identity, and caching an identity is trivially exact, which would test nothing.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                p.zero_()
    return model
