"""The ``adacache`` command line: ``adacache export``, ``adacache explain``, ``adacache bench``."""

from __future__ import annotations

import argparse
import sys
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


def _export(args: argparse.Namespace) -> int:
    import adacache
    from adacache.policies.parse import parse_policy

    model, example = load_named_model(args.model, args.batch)
    cached = adacache.compile(model, parse_policy(args.policy))
    path = adacache.export(cached, args.out, format=args.format, example_inputs=example, precision=args.precision)
    print(f"wrote {args.format} artifact to {path}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    import adacache
    from adacache.policies.parse import parse_policy

    model, (a, kw) = load_named_model(args.model, args.batch)
    cached = adacache.compile(model, parse_policy(args.policy), example_inputs=(a, kw))
    print(adacache.explain(cached))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adacache", description="Feature caching for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    exp = sub.add_parser("export", help="export a cached model as an ONNX or TensorRT artifact")
    exp.add_argument("--model", choices=MODELS, default="reference")
    exp.add_argument("--policy", default="FORA(interval=3)")
    exp.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    exp.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16")
    exp.add_argument("--batch", type=int, default=2, help="batch size the artifact serves (2 = one CFG pair)")
    exp.add_argument("--out", required=True)
    exp.set_defaults(func=_export)

    ex = sub.add_parser("explain", help="print the blocks, cache sites and graph diff for a model and policy")
    ex.add_argument("--model", choices=MODELS, default="reference")
    ex.add_argument("--policy", default="FORA(interval=3)")
    ex.add_argument("--batch", type=int, default=2)
    ex.set_defaults(func=_explain)

    try:
        from adacache.bench.cli import add_bench_parser
    except ImportError:
        add_bench_parser = None
    if add_bench_parser is not None:
        add_bench_parser(sub)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # noqa: BLE001 - the CLI prints adacache's own errors plainly
        from adacache.errors import AdaCacheError

        if isinstance(exc, (AdaCacheError, ValueError)):
            print(f"adacache: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
