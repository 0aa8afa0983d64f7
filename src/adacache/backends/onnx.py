"""Export a cached program to ONNX: caches as explicit inputs/outputs, skips as ``If``.

Why the skip decision lives in the graph (``torch.cond`` -> ONNX ``If``) rather than in a
runtime that picks between per-segment sessions: one artifact holds the whole model, the
cache buffers never leave the device between segments, the loader is a few lines of
IOBinding, and in-graph gates (FirstBlockCache's probe score) need no host round trip.
The cost is one ``If`` per site, measured in ``BENCHMARKS.md``.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..capture.isolation import isolated_export
from ..deploy.check import CHECK_FILE, write_check_file
from ..deploy.manifest import FORMAT, FORMAT_VERSION, write_manifest
from ..errors import ExportError
from ..runtime.module import Runtime
from ..runtime.program import Program
from .verify import Feeds, verify_onnx


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class _FlatTensorsOnly(nn.Module):
    """Calls a flat graph with the non-tensor inputs of the example baked in as constants."""

    def __init__(self, gm: fx.GraphModule, leaves: list[Any]) -> None:
        super().__init__()
        self.gm = gm
        self.leaves = leaves
        self.tensor_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        full = list(self.leaves)
        n_user = len(self.tensor_positions)
        for pos, value in zip(self.tensor_positions, tensors[:n_user]):
            full[pos] = value
        return tuple(self.gm(*full, *tensors[n_user:]))


def _refuse_complex_values(cached: Runtime, program: Program, backend: str) -> None:
    """ONNX has no complex tensors, and torch.onnx converts only some complex operators: a
    model that computes with them (QwenImage's and Lumina2's rotary embeddings, ``torch.polar``
    and ``view_as_complex``) is refused before the exporter fails deep inside, naming the first
    operator that makes a complex value and the model's line."""
    for gm in (m for m in program.portable.modules() if isinstance(m, fx.GraphModule)):  # the graph and its branches
        for node in gm.graph.nodes:
            value = node.meta.get("val")
            if node.op == "call_function" and isinstance(value, torch.Tensor) and value.is_complex():
                line = (node.meta.get("stack_trace") or "").strip().splitlines()
                where = f"\n  {line[-2].strip()}\n    {line[-1].strip()}" if len(line) >= 2 else ""
                raise ExportError(
                    f"{type(cached.model).__name__} computes with complex tensors ({value.dtype}, first made by {node.target}), "
                    f"which {backend} has no type for and torch.onnx converts only in part{where}\n"
                    "Serve it with the PyTorch runtime (eager or backend='inductor'), or write its rotation in real "
                    "arithmetic (cos / sin pairs, as Flux does) to export it"
                )


def check_exportable(cached: Runtime, program: Program, backend: str) -> dict[str, dict[str, Any]]:
    """The schedule spec of every cached site, or an ExportError saying what cannot be exported."""
    policy = cached.policy
    if program.mode == "blocks":
        raise ExportError(
            f"{type(cached.model).__name__} was captured with capture='blocks' (torch.export cannot capture it whole), so "
            f"there is no single graph to export to {backend}: its own code runs eagerly between its captured runs of "
            "blocks. adacache.compile(..., capture='graph') names the line that stops whole-model capture; serve this "
            "model with the PyTorch runtime (eager or backend='inductor')"
        )
    _refuse_complex_values(cached, program, backend)
    if backend not in policy.backends:
        raise ExportError(
            f"{type(policy).__name__} cannot be exported to {backend}: its decisions need the PyTorch runtime "
            f"(it runs on {policy.backends}); use adacache.compile(..., backend='inductor') for a compiled "
            "PyTorch model, or a graph-level policy (FORA, FirstBlockCache) for an engine"
        )
    schedules = {}
    for site in program.cached_sites:
        try:
            schedules[site.name] = policy.schedule(site)
        except NotImplementedError as exc:
            raise ExportError(
                f"{type(policy).__name__} has no data schedule for site {site.label}, so a {backend} engine "
                "could not reproduce its decisions; use backend='inductor' instead"
            ) from exc
    return schedules


def export_onnx(
    cached: Runtime,
    directory: str | Path,
    example_inputs: tuple[tuple[Any, ...], dict[str, Any]],
    *,
    opset: int | None = None,
    optimize: bool = True,
    verify: bool = True,
    keep_failed: bool = False,
) -> Path:
    """Write ``model.onnx`` and ``manifest.json`` for the program of ``example_inputs``.

    The artifact is specialised to the example's shapes (as every adacache program is);
    export one artifact per resolution / batch size you serve. With ``verify`` (the default)
    the written file is run in ONNX Runtime next to the compiled model on the example inputs
    (:mod:`adacache.backends.verify`); where onnxscript's optimizer changed what it computes,
    the model is exported again without it (the manifest says so), and an artifact that still
    differs is refused with an ``ExportError`` naming the first output that differs (and
    removed, unless ``keep_failed``).
    """
    args, kwargs = example_inputs
    program = cached.prepare(*args, **kwargs)
    schedules = check_exportable(cached, program, "onnx")
    feeds = _feeds(program, args, kwargs)
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_file = "model.onnx"
    _write_onnx(cached, program, feeds, out_dir / model_file, opset, optimize)
    verification: dict[str, Any] = {"verified": False, "optimized": optimize}
    (out_dir / CHECK_FILE).unlink(missing_ok=True)  # an earlier export's calls do not check this file
    if verify:
        verification = _verified(cached, program, feeds, out_dir / model_file, opset, optimize, keep_failed)
    manifest = _manifest(cached, program, feeds, schedules, model_file, verification)
    write_manifest(out_dir, manifest)
    return out_dir


def _feeds(program: Program, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Feeds:
    layout = program.layout
    leaves = program.captured.flatten_inputs(args, kwargs)
    placeholders = [n for n in program.portable.graph.nodes if n.op == "placeholder"]
    user_placeholders = placeholders[: layout.num_user_inputs]
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    user_names = [user_placeholders[i].name for i in positions]
    return Feeds(
        user=[leaves[i] for i in positions],
        all_leaves=leaves,
        input_names=[*user_names, *(c.name for c in layout.controls), *(s.name for s in layout.states)],
        output_names=[*(f"output_{i}" for i in range(layout.num_user_outputs)), *(f"{s.name}__out" for s in layout.states),
                      *(s.name for s in layout.signals)],
    )


def _write_onnx(cached: Runtime, program: Program, feeds: Feeds, path: Path, opset: int | None, optimize: bool) -> None:
    layout = program.layout
    wrapper = _FlatTensorsOnly(program.portable, feeds.all_leaves).eval()
    device = feeds.user[0].device if feeds.user else torch.device("cpu")
    controls = _example_controls(layout, device)
    try:
        with torch.no_grad():
            # On a structural copy, one export at a time: the program's weights are the
            # model's, which other threads may be running (capture/isolation.py).
            onnx_program = isolated_export(lambda tree: torch.onnx.export(
                tree,
                tuple([*feeds.user, *controls, *program.initial_state(device)]),
                dynamo=True,
                input_names=feeds.input_names,
                output_names=feeds.output_names,
                opset_version=opset,
                optimize=optimize,
                verbose=False,
            ), wrapper)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise ExportError(f"torch.onnx.export failed for {cached.policy.describe()}: {exc}") from exc
    onnx_program.save(str(path))


def _example_controls(layout: Any, device: torch.device) -> list[torch.Tensor]:
    """Controls of the traced example (their values do not matter, their shapes and dtypes do)."""
    return [torch.ones(layout.forecast_order + 1, device=device) if spec.kind != "allow" else torch.tensor(False, device=device)
            for spec in layout.controls]


def _verified(cached: Runtime, program: Program, feeds: Feeds, path: Path, opset: int | None, optimize: bool,
              keep_failed: bool) -> dict[str, Any]:
    """What the manifest records of the check (the checked calls are kept beside the model for
    ``adacache check``); an ExportError where the artifact is wrong."""
    calls: list[Any] = []
    problem = verify_onnx(path, program, feeds, calls)
    if problem is None:
        return {"verified": True, "optimized": optimize, "check_file": write_check_file(path.parent, calls)}
    if optimize:
        # onnxscript's optimizer can change numbers (it folds `x + 1e-15` into `x`): without it.
        _write_onnx(cached, program, feeds, path, opset, optimize=False)
        calls = []
        if verify_onnx(path, program, feeds, calls) is None:
            return {"verified": True, "optimized": False, "optimizer_changed": problem,
                    "check_file": write_check_file(path.parent, calls)}
    if not keep_failed:
        path.unlink(missing_ok=True)
    raise ExportError(
        f"the ONNX export of {cached.policy.describe()} does not compute what the compiled model computes: {problem}. "
        + ("The file was kept for inspection at " + str(path) if keep_failed else
           "Nothing was left behind; pass keep_failed=True to keep the file for inspection")
    )


def _manifest(cached: Runtime, program: Program, feeds: Feeds, schedules: dict[str, Any], model_file: str,
              verification: dict[str, Any]) -> dict[str, Any]:
    layout = program.layout
    order = layout.forecast_order
    leaves = feeds.all_leaves
    placeholders = [n for n in program.portable.graph.nodes if n.op == "placeholder"][: layout.num_user_inputs]
    user_names = feeds.input_names[: len(feeds.user)]
    user_tensors = feeds.user
    controls = _example_controls(layout, torch.device("cpu"))
    user_out_names = feeds.output_names[: layout.num_user_outputs]
    state_out_names = feeds.output_names[layout.num_user_outputs : layout.num_user_outputs + len(layout.states)]
    timestep_input = next((n for n in user_names if n in cached.timestep_names), None)
    sites = {s.name: s for s in layout.sites}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": "onnx",
        "model_file": model_file,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_class": type(cached.model).__name__,
        "policy": cached.policy.to_dict(),
        "schedules": schedules,
        "timestep_input": timestep_input,
        "inputs": [
            *({"name": n, "role": "user", "shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for n, t in zip(user_names, user_tensors)),
            *({"name": spec.name, "role": "control", "shape": list(c.shape), "dtype": _dtype_name(c.dtype)} for spec, c in zip(layout.controls, controls)),
            *({"name": s.name, "role": "state", "shape": list(s.shape), "dtype": _dtype_name(s.dtype)} for s in layout.states),
        ],
        "outputs": [
            *({"name": n, "role": "user", "index": i} for i, n in enumerate(user_out_names)),
            *({"name": n, "role": "state"} for n in state_out_names),
            *({"name": s.name, "role": "signal"} for s in layout.signals),
        ],
        "states": [
            {"name": s.name, "output": f"{s.name}__out", "site": s.site, "kind": s.kind,
             "shape": list(s.shape), "dtype": _dtype_name(s.dtype), "initial": "zeros" if s.kind == "cache" else "false"}
            for s in layout.states
        ],
        "controls": [{"name": c.name, "site": c.site} for c in layout.controls if c.kind == "allow"],
        "forecast": (
            {"order": order, **{c.kind.removeprefix("forecast_"): c.name for c in layout.controls if c.kind != "allow"},
             "schedule_of": program.cached_sites[0].name,
             **({"basis": basis} if (basis := cached.policy.forecast_basis()) is not None else {})}
            if order else None
        ),
        "signals": [{"name": s.name, "site": s.site, "kind": s.kind} for s in layout.signals],
        "sites": [
            {"name": s.name, "label": s.label, "role": s.role, "reuse": s.reuse, "gated_by": s.gated_by, "threshold": s.threshold}
            for s in sites.values()
        ],
        "constants": {p.name: repr(leaves[i]) for i, p in enumerate(placeholders) if not isinstance(leaves[i], torch.Tensor)},
        "verification": verification,
        "versions": {k: _version(k) for k in ("adacache", "torch", "onnx", "onnxscript", "onnxruntime")},
    }
    return manifest


def export_plain_onnx(model: nn.Module, path: str | Path, example_inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> Path:
    """Export the *uncached* model the same way, as the baseline for speed comparisons."""
    args, kwargs = example_inputs
    with torch.no_grad():
        program = isolated_export(
            lambda tree: torch.onnx.export(tree, tuple(args), kwargs=kwargs, dynamo=True, optimize=True, verbose=False), model)
    program.save(str(path))
    return Path(path)
