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
from .runtime.module import Runtime, compiled_view, plain_model
from .runtime.callers import is_pipeline
from .runtime.pipeline import DENOISER_NAMES, compile_pipeline, uncompile_pipeline
from .validate import check_example_inputs


def compile(  # noqa: A001 - mirrors torch.compile on purpose
    model: Any,
    policy: Policy,
    *,
    blocks: str | Sequence[str] | None = None,
    backend: str = "eager",
    example_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    timestep_arg: str | None = None,
    capture: str = "auto",
) -> Any:
    """Cache the transformer blocks of a model, or of every denoiser of a diffusers pipeline.

    Args:
        model: a DiT (diffusers transformer or any module with repeated residual blocks), or
            a diffusers pipeline: then each ``transformer`` / ``transformer_2`` is compiled and
            every pipeline call is one request with fresh caches.
        policy: ``adacache.FORA(...)``, ``adacache.FirstBlockCache(...)``, ...
        blocks: glob(s) over qualified module names that name the blocks, when the
            automatic search (``_repeated_blocks``, ``transformer_blocks``, ``blocks``, ...)
            does not fit the model.
        backend: ``"eager"`` (default) or ``"inductor"`` (``torch.compile`` of the cached
            graph; the skip decision is a graph input, so it never re-traces).
        example_inputs: ``(args, kwargs)`` to capture with now (a model only); otherwise the
            first call's inputs are used.
        timestep_arg: the name of the input that carries the timestep (or noise level), when
            it is none of ``timestep``, ``timesteps``, ``t``, ``sigma``, ``sigmas``. Steps, CFG
            slots and requests are told apart by it; a model called without a recognised one
            warns once (``adacache.TimestepWarning``) and counts each call as a step.
        capture: ``"graph"`` captures the whole model with ``torch.export`` (a failure is a
            ``CaptureError``); ``"blocks"`` runs the model's own code eagerly and captures each
            run of its blocks (no ONNX / TensorRT export); ``"auto"`` (default) tries the whole
            graph and falls back to blocks with one ``adacache.CaptureFallbackWarning``.

    Returns:
        For a model: the compiled model, an instance of a subclass of the model's class that
        shares its state (weights, adapters, processors), so diffusers' and PEFT's methods keep
        working on it; the model passed in is not changed. Its runtime is ``compiled.adacache``.
        For a pipeline: a copy of the pipeline (same components) with compiled denoisers.
        :func:`uncompile` gives back the plain model or pipeline.
    """
    def runtime_for(module: nn.Module) -> Runtime:
        return Runtime(module, policy, blocks=blocks, backend=backend, timestep_arg=timestep_arg, capture=capture)

    if is_pipeline(model):
        if example_inputs is not None:
            raise TypeError("example_inputs applies to a model; a pipeline captures its denoisers at its first call")
        return compile_pipeline(model, policy, runtime_for)
    if isinstance(model, CachedModule):
        raise TypeError("this model is already compiled by adacache; compile adacache.uncompile(model) to change the policy")
    runtime = runtime_for(model)
    compiled = compiled_view(model, runtime)
    if example_inputs is not None:
        args, kwargs = check_example_inputs(example_inputs)
        runtime.prepare(*args, **kwargs)
    return compiled


def uncompile(model: Any) -> Any:
    """The plain model (or pipeline with plain denoisers) behind what :func:`compile` returned.

    Nothing is copied: the plain model shares the compiled one's weights and adapters.
    """
    if isinstance(model, CachedModule):
        return plain_model(model)
    if is_pipeline(model):
        return uncompile_pipeline(model)
    raise TypeError(f"expected a model or pipeline returned by adacache.compile, got {type(model).__name__}")


def export(
    model: nn.Module,
    directory: str | Path,
    *,
    format: str = "onnx",  # noqa: A002 - the natural name for users
    example_inputs: tuple[tuple[Any, ...], dict[str, Any]],
    precision: str = "fp16",
    opset: int | None = None,
    verify: bool = True,
    keep_failed: bool = False,
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
        verify: run the written ONNX file in ONNX Runtime next to the compiled model on the
            example inputs, through both branches of every site, and refuse (``ExportError``
            naming the first output that differs) an artifact that computes something else;
            where onnxscript's optimizer is what changed the numbers, the file is written
            again without it (``manifest["verification"]`` says so).
        keep_failed: keep a file that failed the check, for inspection.
    """
    cached = _cached(model)
    example_inputs = check_example_inputs(example_inputs)
    if format == "onnx":
        from .backends.onnx import export_onnx

        return export_onnx(cached, directory, example_inputs, opset=opset, verify=verify, keep_failed=keep_failed)
    if format == "tensorrt":
        from .backends.tensorrt import export_tensorrt

        return export_tensorrt(cached, directory, example_inputs, precision=precision, opset=opset)
    raise ValueError(f"unknown export format {format!r}; use 'onnx' or 'tensorrt'")


def _cached(model: Any, denoiser: str | None = None) -> Runtime:
    """The runtime of a compiled model, or of a compiled pipeline's denoiser (``denoiser``,
    by default the first compiled one: ``transformer``, then ``transformer_2``)."""
    if is_pipeline(model):
        names = [n for n in DENOISER_NAMES if isinstance(getattr(model, n, None), CachedModule)]
        if denoiser is not None and denoiser not in names:
            raise ValueError(f"{type(model).__name__} has no compiled denoiser {denoiser!r}; its compiled denoisers: {names}")
        if names:
            model = getattr(model, denoiser or names[0])
    elif denoiser is not None:
        raise TypeError("denoiser= names a component of a pipeline; pass the pipeline, or the compiled model alone")
    if not isinstance(model, CachedModule):
        raise TypeError(f"expected a model or pipeline returned by adacache.compile, got {type(model).__name__}")
    return type(model).adacache


def session(
    model: nn.Module, total_steps: int | None = None, *, denoiser: str | None = None
) -> contextlib.AbstractContextManager[Session]:
    """``with adacache.session(model) as s:`` runs one request with its own cache state
    (``total_steps``: how many steps it will run, when known; ``denoiser``: which compiled
    denoiser of a pipeline, by default its first)."""
    return _cached(model, denoiser).session(total_steps)


def summary(model: nn.Module, session: Session | None = None, *, denoiser: str | None = None) -> Summary:
    """Hit rate per site and step, FLOPs skipped and cache bytes of a session.

    Uses the session of this thread's latest call (for a pipeline, its latest call's request)
    unless one is given. Per-step rows cover the current (or last) request; counters cover
    the session's whole life. For a pipeline with two denoisers (Wan 2.2), ``denoiser``
    picks one (``"transformer"`` by default, or ``"transformer_2"``).
    """
    cached = _cached(model, denoiser)
    sess = session or cached.latest_session()
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
        restarts=stats.restarts,
        recaptures=list(stats.recaptures),
    )


def explain(model: nn.Module, *, denoiser: str | None = None) -> str:
    """What the compiler did to the most recently captured graph: blocks, sites, graph diff
    (``denoiser``: which compiled denoiser of a pipeline, by default its first)."""
    cached = _cached(model, denoiser)
    if not cached.programs:
        return "adacache: nothing captured yet; call the model once or pass example_inputs to adacache.compile"
    program = cached.programs[-1]
    lines = [
        f"adacache: {cached.policy.describe()} on {type(cached.model).__name__}, backend {program.backend}",
        "capture: " + (
            "graph (the whole model is one captured graph)" if program.mode == "graph"
            else f"blocks (the model's own code runs eagerly; {len(program.runs)} run(s) of blocks captured)"
        ),
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
    if program.mode == "graph":
        lines += ["graph diff (captured -> cached):", graph_diff(program.original, program.portable)]
    for run in program.runs or ():
        if run.first.compiled is None:
            lines.append(f"run {run.plan.describe()}: {run.first.reason}")
        else:
            lines += [f"run {run.plan.describe()}, graph diff (captured -> cached):",
                      graph_diff(run.first.compiled.original, run.first.compiled.portable)]
    return "\n".join(lines)
