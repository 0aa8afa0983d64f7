"""The models the command line and the benchmarks know by name, built offline with their
example inputs (the shipped reference model, or random-weight DiTs)."""

from __future__ import annotations

from typing import Any

MODELS = ("reference", "dit-s", "dit-b", "tiny", "diffusers-dit-s", "diffusers-dit-b")


def load_named_model(name: str, batch: int = 2) -> tuple[Any, tuple[tuple[Any, ...], dict[str, Any]]]:
    """A model the CLI knows by name, with example inputs of the given batch size."""
    import torch

    if name == "reference":
        from adacache.reference import load_reference_model

        model = load_reference_model()
        cfg = model.config
        x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(batch) % 10
        return model, ((), {"hidden_states": x, "timestep": torch.full((batch,), 999), "class_labels": labels})
    if name.startswith("diffusers-"):
        from diffusers import DiTTransformer2DModel

        width = {"diffusers-dit-s": (6, 64), "diffusers-dit-b": (12, 64)}[name]
        model = DiTTransformer2DModel(
            num_attention_heads=width[0], attention_head_dim=width[1], in_channels=4, out_channels=8, num_layers=12,
            sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
        )
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # random, non-zero gates: adaLN-Zero's init makes blocks the identity
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5 if p.dim() > 1 else 50.0))
        x = torch.randn(batch, 4, 32, 32, generator=gen)
        # A CFG pair batch: conditional half first, the null class (1000) second.
        labels = torch.tensor([i % 10 for i in range(batch // 2)] + [1000] * (batch - batch // 2))
        return model.eval(), ((), {"hidden_states": x, "timestep": torch.full((batch,), 999), "class_labels": labels})
    from adacache.models import DiT, DiTConfig, init_dit_weights

    config = {"dit-s": DiTConfig.small(), "dit-b": DiTConfig.base(), "tiny": DiTConfig.tiny()}[name]
    model = init_dit_weights(DiT(config)).eval()
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=torch.Generator().manual_seed(0))
    return model, ((), {"x": x, "timestep": torch.full((batch,), 999.0), "class_labels": torch.arange(batch) % 10})
