"""The public entry points: compile, session, summary, explain."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .report import SiteSummary, Summary, graph_diff
from .policies.base import Policy
from .runtime import CachedModule, Session


def compile(  # noqa: A001 - mirrors torch.compile on purpose
    model: nn.Module,
    policy: Policy,
    *,
    blocks: str | Sequence[str] | None = None,
    backend: str = "eager",
    example_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
) -> CachedModule:
    """Wrap ``model`` so its transformer blocks are cached by ``policy``.

    Args:
        model: a DiT (diffusers transformer or any module with repeated residual blocks).
        policy: ``adacache.FORA(...)``, ``adacache.FirstBlockCache(...)``, ...
        blocks: glob(s) over qualified module names that name the blocks, when the
            automatic search (``_repeated_blocks``, ``transformer_blocks``, ``blocks``, ...)
            does not fit the model.
        backend: ``"eager"`` (default) or ``"inductor"`` (``torch.compile`` of the cached
            graph; the skip decision is a graph input, so it never re-traces).
        example_inputs: ``(args, kwargs)`` to capture with now; otherwise the first call's
            inputs are used.

    Returns:
        A module with the model's call signature and output type.
    """
    cached = CachedModule(model, policy, blocks=blocks, backend=backend)
    if example_inputs is not None:
        args, kwargs = example_inputs
        cached.prepare(*args, **kwargs)
    return cached


def export(
    model: nn.Module,
    directory: str | Path,
    *,
    format: str = "onnx",  # noqa: A002 - the natural name for users
    example_inputs: tuple[tuple[Any, ...], dict[str, Any]],
    precision: str = "fp16",
    opset: int | None = None,
) -> Path:
    """Export a compiled model as a deployable artifact (model file + ``manifest.json``).

    Args:
        model: a model returned by :func:`adacache.compile`.
        directory: the artifact folder to write.
        format: ``"onnx"`` (runs with ``adacache.load`` on ONNX Runtime) or ``"tensorrt"``
            (builds a TensorRT engine from the ONNX export; needs a CUDA GPU and ``tensorrt``).
        example_inputs: ``(args, kwargs)`` with the shapes the artifact will serve.
        precision: TensorRT precision, ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        opset: ONNX opset (default: the exporter's).
    """
    cached = _cached(model)
    if format == "onnx":
        from .backends.onnx import export_onnx

        return export_onnx(cached, directory, example_inputs, opset=opset)
    if format == "tensorrt":
        from .backends.tensorrt import export_tensorrt

        return export_tensorrt(cached, directory, example_inputs, precision=precision, opset=opset)
    raise ValueError(f"unknown export format {format!r}; use 'onnx' or 'tensorrt'")


def _cached(model: nn.Module) -> CachedModule:
    if not isinstance(model, CachedModule):
        raise TypeError(f"expected a model returned by adacache.compile, got {type(model).__name__}")
    return model


def session(model: nn.Module) -> contextlib.AbstractContextManager[Session]:
    """``with adacache.session(model) as s:`` runs one request with its own cache state."""
    return _cached(model).session()


def summary(model: nn.Module, session: Session | None = None) -> Summary:
    """Hit rate per site and step, FLOPs skipped and cache bytes of a session.

    Uses this thread's current session unless one is given. Per-step rows cover the
    current (or last) generation; counters cover the session's whole life.
    """
    cached = _cached(model)
    sess = session or cached.current_session()
    stats = sess.stats
    programs = cached.programs
    if not programs:
        return Summary(cached.policy.describe(), [], 0, 0, 0, 0, 0, 0, 0)
    program = next((s.program for s in sess.slots.values()), programs[-1])
    flops = program.site_flops()
    totals = stats.totals()
    sites = []
    for site in program.layout.sites:
        reused, calls = totals.get(site.name, (0, 0))
        if site.role in ("probe", "fresh"):  # these run at every call
            calls = stats.calls
        sites.append(SiteSummary(site.name, site.label, reused, calls, flops[site.name]))
    per_step = [
        {"step": r.step, "slot": r.slot, "reused": {k: bool(v) for k, v in r.reused.items()}}
        for r in stats.records
    ]
    return Summary(
        policy=cached.policy.describe(),
        sites=sites,
        calls=stats.calls,
        generations=stats.generations,
        captures=stats.captures,
        invalidations=stats.invalidations,
        nonfinite=stats.nonfinite,
        cache_bytes=sess.cache_bytes(),
        model_flops_per_call=flops["<model>"],
        per_step=per_step,
        replays=stats.replays,
    )


def explain(model: nn.Module) -> str:
    """What the compiler did to the most recently captured graph: blocks, sites, graph diff."""
    cached = _cached(model)
    if not cached.programs:
        return "adacache: nothing captured yet; call the model once or pass example_inputs to adacache.compile"
    program = cached.programs[-1]
    lines = [
        f"adacache: {cached.policy.describe()} on {type(cached.model).__name__}, backend {program.backend}",
        f"captured for: {program.captured.signature.describe()}",
        f"eligible blocks: {len(program.blocks)} ({', '.join(b.name for b in program.blocks[:3])}"
        + (", ..." if len(program.blocks) > 3 else "") + ")",
        "cache sites:",
    ]
    for site in program.layout.sites:
        gate = f", gated by {site.gated_by} score < {site.threshold}" if site.gated_by else ""
        lines.append(f"  {site.name}: {site.label} [{site.role}, reuse {site.reuse}{gate}]")
    layout = program.layout
    lines.append(
        f"graph inputs: {layout.num_user_inputs} user + {len(layout.controls)} controls + {len(layout.states)} cache; "
        f"outputs: {layout.num_user_outputs} user + {len(layout.states)} cache + {len(layout.signals)} signals"
    )
    lines.append("graph diff (captured -> cached):")
    lines.append(graph_diff(program.original, program.portable))
    return "\n".join(lines)
