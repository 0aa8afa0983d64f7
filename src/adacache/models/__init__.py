"""Model families that ship with adacache (no diffusers needed)."""

from .dit import DiT, DiTBlock, DiTConfig, init_dit_weights

__all__ = ["DiT", "DiTBlock", "DiTConfig", "init_dit_weights"]
