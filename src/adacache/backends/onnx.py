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
from ..deploy.manifest import FORMAT, FORMAT_VERSION, write_manifest
from ..errors import ExportError
from ..runtime.module import Runtime
from ..runtime.program import Program


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


def check_exportable(cached: Runtime, program: Program, backend: str) -> dict[str, dict[str, Any]]:
    """The schedule spec of every cached site, or an ExportError saying what cannot be exported."""
    policy = cached.policy
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
) -> Path:
    """Write ``model.onnx`` and ``manifest.json`` for the program of ``example_inputs``.

    The artifact is specialised to the example's shapes (as every adacache program is);
    export one artifact per resolution / batch size you serve.
    """
    args, kwargs = example_inputs
    program = cached.prepare(*args, **kwargs)
    schedules = check_exportable(cached, program, "onnx")
    layout = program.layout
    leaves = program.captured.flatten_inputs(args, kwargs)
    placeholders = [n for n in program.portable.graph.nodes if n.op == "placeholder"]
    user_placeholders = placeholders[: layout.num_user_inputs]
    wrapper = _FlatTensorsOnly(program.portable, leaves).eval()
    user_tensors = [leaves[i] for i in wrapper.tensor_positions]
    user_names = [user_placeholders[i].name for i in wrapper.tensor_positions]
    device = user_tensors[0].device if user_tensors else torch.device("cpu")
    order = layout.forecast_order
    controls = [
        torch.ones(order + 1, device=device) if spec.kind != "allow" else torch.tensor(False, device=device)
        for spec in layout.controls
    ]
    states = program.initial_state(device)

    user_out_names = [f"output_{i}" for i in range(layout.num_user_outputs)]
    state_out_names = [f"{s.name}__out" for s in layout.states]
    input_names = [*user_names, *(c.name for c in layout.controls), *(s.name for s in layout.states)]
    output_names = [*user_out_names, *state_out_names, *(s.name for s in layout.signals)]

    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            # On a structural copy, one export at a time: the program's weights are the
            # model's, which other threads may be running (capture/isolation.py).
            onnx_program = isolated_export(lambda tree: torch.onnx.export(
                tree,
                tuple([*user_tensors, *controls, *states]),
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                optimize=optimize,
                verbose=False,
            ), wrapper)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise ExportError(f"torch.onnx.export failed for {cached.policy.describe()}: {exc}") from exc
    model_file = "model.onnx"
    onnx_program.save(str(out_dir / model_file))

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
             "schedule_of": program.cached_sites[0].name}
            if order else None
        ),
        "signals": [{"name": s.name, "site": s.site, "kind": s.kind} for s in layout.signals],
        "sites": [
            {"name": s.name, "label": s.label, "role": s.role, "reuse": s.reuse, "gated_by": s.gated_by, "threshold": s.threshold}
            for s in sites.values()
        ],
        "constants": {p.name: repr(leaves[i]) for i, p in enumerate(user_placeholders) if i not in wrapper.tensor_positions},
        "versions": {k: _version(k) for k in ("adacache", "torch", "onnx", "onnxscript", "onnxruntime")},
    }
    write_manifest(out_dir, manifest)
    return out_dir


def export_plain_onnx(model: nn.Module, path: str | Path, example_inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> Path:
    """Export the *uncached* model the same way, as the baseline for speed comparisons."""
    args, kwargs = example_inputs
    with torch.no_grad():
        program = isolated_export(
            lambda tree: torch.onnx.export(tree, tuple(args), kwargs=kwargs, dynamo=True, optimize=True, verbose=False), model)
    program.save(str(path))
    return Path(path)
