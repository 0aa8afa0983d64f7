"""Trace a model with ``torch.export`` (non-strict) into a flat GraphModule.

The graph is captured on real inputs, once per *input signature* (the shapes, dtypes and
devices of the tensor inputs plus the values of non-tensor inputs). A new batch size or
resolution is a new signature and is captured again; see ``docs/design.md`` for why this
beats dynamic shapes for the models we target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from ..errors import CaptureError
from .diagnose import capture_error
from .isolation import isolated_export


@dataclass(frozen=True)
class InputSignature:
    """What a captured graph is specialised to: tree structure, tensor metadata, constants."""

    treespec: str
    leaves: tuple[tuple[Any, ...], ...]

    def describe(self) -> str:
        """A short human-readable form, for error messages and summaries."""
        parts = []
        for leaf in self.leaves:
            if leaf[0] == "tensor":
                _, path, shape, dtype, device = leaf
                parts.append(f"{path}: {dtype.replace('torch.', '')}{list(shape)}@{device}")
            else:
                _, path, value = leaf
                parts.append(f"{path}={value!r}")
        return ", ".join(parts)


def _leaf_path(path: tuple[Any, ...]) -> str:
    """``x`` for a keyword input, ``args[0]`` for a positional one, ``cond.text`` nested."""
    parts: list[str] = []
    for i, key in enumerate(path):
        if isinstance(key, pytree.MappingKey):
            parts.append(str(key.key))
        elif isinstance(key, pytree.SequenceKey):
            if i == 0:
                continue  # the (args, kwargs) pair itself
            parts.append(f"args[{key.idx}]" if i == 1 and path[0].idx == 0 else f"[{key.idx}]")
        elif isinstance(key, pytree.GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(key))
    return ".".join(parts).replace(".[", "[") or "<root>"


def signature_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> InputSignature:
    """The signature of one call's inputs (tensors by metadata, everything else by value)."""
    leaves_with_path, spec = pytree.tree_flatten_with_path((args, kwargs))
    leaves = []
    for path, leaf in leaves_with_path:
        name = _leaf_path(path)
        if isinstance(leaf, torch.Tensor):
            leaves.append(("tensor", name, tuple(leaf.shape), str(leaf.dtype), str(leaf.device)))
        else:
            try:
                hash(leaf)
            except TypeError:
                leaf = repr(leaf)
            leaves.append(("const", name, leaf))
    return InputSignature(treespec=str(spec), leaves=tuple(leaves))


@dataclass
class CapturedGraph:
    """A model captured on one input signature.

    ``graph_module`` takes the flat leaves of ``(args, kwargs)`` positionally and returns
    the flat leaves of the model's output; ``out_spec`` rebuilds the model's own output
    type (diffusers output dataclasses, tuples for ``return_dict=False``).
    """

    graph_module: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    signature: InputSignature
    input_names: list[str] = field(default_factory=list)

    def flatten_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """Flat leaves of a call's inputs in the order of the graph's placeholders."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.in_spec:
            raise CaptureError(
                f"inputs do not have the structure the graph was captured with: got {spec}, "
                f"captured {self.in_spec}"
            )
        return leaves

    def unflatten_outputs(self, flat: list[Any]) -> Any:
        """Rebuild the model's own output object from flat graph outputs."""
        return pytree.tree_unflatten(list(flat), self.out_spec)


def _input_summary(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    return signature_of(args, kwargs).describe()


def _flatten_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Turn ``ExportedProgram.module()`` into a graph over flat positional leaves.

    The pytree codegen and the shape-guard node are removed: the runtime checks input
    signatures itself and rebuilds output objects from ``out_spec``, and the passes and
    backends want a plain ``(flat inputs) -> tuple(flat outputs)`` graph.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
            if hasattr(gm, str(node.target)):
                delattr(gm, str(node.target))
    graph._codegen = fx.graph.CodeGen()
    out = graph.output_node()
    flat_outs = out.args[0]
    if not isinstance(flat_outs, (tuple, list)):
        flat_outs = (flat_outs,)
    out.args = (tuple(flat_outs),)
    graph.lint()
    # A fresh GraphModule drops the input-checking pre-hook that ExportedProgram.module()
    # installs for the pytree signature; parameters are shared, not copied.
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}


def drop_noops(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove what inference never needs: export's metadata asserts, eval-mode dropout,
    and dtype conversions to the dtype a tensor already has. Each costs a dispatcher round
    trip per step when the graph runs eagerly, and none changes a value."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _ASSERTS and not node.users:
            graph.erase_node(node)
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            continue
        if node.target is torch.ops.aten.dropout.default:
            p, train = node.args[1], node.args[2]
            if not train or p == 0:
                node.replace_all_uses_with(source)
                graph.erase_node(node)
        elif node.target is torch.ops.aten.to.dtype and not node.kwargs.get("copy", False):
            before, after = source.meta.get("val"), node.meta.get("val")
            if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.dtype == after.dtype:
                node.replace_all_uses_with(source)
                graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def capture(
    model: nn.Module,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> CapturedGraph:
    """Capture ``model(*args, **kwargs)`` as a flat FX graph with ``torch.export`` (non-strict).

    The model's own ``forward`` is traced (one set on the instance, as accelerate's offload
    hooks do, is bypassed), on a copy of its module tree that shares its tensors.

    Raises:
        CaptureError: export failed; the message names the model's line that could not be
            traced, the submodule running it, the inputs and the options that apply, and
            keeps the exporter's diagnostic (see :mod:`adacache.capture.diagnose`).
    """
    kwargs = dict(kwargs or {})
    traced: list[nn.Module] = []

    def export(tree: nn.Module) -> torch.export.ExportedProgram:
        traced.append(tree)
        return torch.export.export(tree, tuple(args), kwargs, strict=False)

    try:
        with torch.no_grad():
            # The exporter traces a structural copy: the user's model is never touched, so
            # other threads may go on running it (see capture/isolation.py).
            exported = isolated_export(export, model)
    except Exception as exc:  # noqa: BLE001 - re-raised with context below
        raise capture_error(model, traced[0] if traced else model, _input_summary(args, kwargs), exc) from exc
    gm = drop_noops(_flatten_graph(exported.module()))
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return CapturedGraph(
        graph_module=gm,
        in_spec=exported.call_spec.in_spec,
        out_spec=exported.call_spec.out_spec,
        signature=signature_of(args, kwargs),
        input_names=names,
    )

