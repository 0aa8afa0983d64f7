"""The ``adacache`` command line: ``adacache export``, ``adacache explain``, ``adacache bench``."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODELS = ("reference", "dit-s", "dit-b", "tiny", "diffusers-dit-s", "diffusers-dit-b")
#: The largest --batch the command line builds example inputs for: far above any CFG batch one
#: would export, and below the sizes where building the inputs alone exhausts memory.
MAX_BATCH = 1024


# -- argument types: each value is checked when parsed, so a bad one is a usage error (exit 2)
# -- before any model is loaded, not a traceback after minutes of work.

def int_in(minimum: int, maximum: int | None = None, why: str = "") -> Callable[[str], int]:
    """An argparse ``type`` for an integer in ``[minimum, maximum]``; ``why`` explains the bound."""

    def parse(text: str) -> int:
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected an integer {bound}{why}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def finite_float(minimum: float | None = None, why: str = "") -> Callable[[str], float]:
    """An argparse ``type`` for a finite float ``>= minimum``; NaN and infinity are refused."""

    def parse(text: str) -> float:
        bound = "" if minimum is None else f" >= {minimum:g}"
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number{bound}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number{bound}, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number{bound}{why}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def accepted_by(parse: Callable[[str], Any]) -> Callable[[str], str]:
    """An argparse ``type``: the text itself, if ``parse`` accepts it (it is parsed again when
    used); a ``PolicyError`` from ``parse`` becomes a usage error."""

    def check(text: str) -> str:
        from adacache.errors import PolicyError

        try:
            parse(text)
        except PolicyError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    check.__name__ = "policy"
    return check


def _parse_policy(text: str) -> Any:
    from adacache.policies.parse import parse_policy  # imported when an argument is checked, not at start-up

    return parse_policy(text)


#: An argparse ``type`` for a policy expression.
policy_expression = accepted_by(_parse_policy)


def output_folder(text: str) -> str:
    """An argparse ``type``: a folder that exists or can be created, and can be written to.

    Checked up front because the folder is written last, after the work it records.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder path, got an empty string")
    path = Path(text)
    try:
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} exists and is not a folder; name a folder to write into")
        existing = path
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise argparse.ArgumentTypeError(f"cannot create the folder {text}: {existing} is not a folder")
        # Try it rather than ask os.access, which answers yes to root even where a write fails
        # (read-only mounts, /proc); the probe folder is removed at once.
        try:
            with tempfile.TemporaryDirectory(dir=existing, prefix=".adacache-write-check-"):
                pass
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot write to {existing} ({exc.strerror}); choose a folder you can write to") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot use {text} as the output folder: {exc}") from None
    return text


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


def _check_export(args: argparse.Namespace) -> str | None:
    """What the export needs installed, found before the model is loaded and compiled."""
    needs = ["onnx", "onnxscript"] + (["tensorrt"] if args.format == "tensorrt" else [])
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        extra = "gpu" if "tensorrt" in missing else "onnx"
        return f"--format {args.format} needs {', '.join(missing)}: pip install 'adacache[{extra}]'"
    return None


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
    exp.add_argument("--policy", type=policy_expression, default="FORA(interval=3)")
    exp.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    exp.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16")
    exp.add_argument("--batch", type=int_in(1, MAX_BATCH), default=2, help="batch size the artifact serves (2 = one CFG pair)")
    exp.add_argument("--out", type=output_folder, required=True)
    exp.set_defaults(func=_export, check=_check_export, parser=exp)

    ex = sub.add_parser("explain", help="print the blocks, cache sites and graph diff for a model and policy")
    ex.add_argument("--model", choices=MODELS, default="reference")
    ex.add_argument("--policy", type=policy_expression, default="FORA(interval=3)")
    ex.add_argument("--batch", type=int_in(1, MAX_BATCH), default=2)
    ex.set_defaults(func=_explain, parser=ex)

    try:
        from adacache.bench.cli import add_bench_parser
    except ImportError:
        add_bench_parser = None
    if add_bench_parser is not None:
        add_bench_parser(sub)

    args = parser.parse_args(argv)
    # Checks that involve several arguments or the installation: still usage errors, still up front.
    check = getattr(args, "check", None)
    problem = check(args) if check is not None else None
    if problem:
        getattr(args, "parser", parser).error(problem)
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
