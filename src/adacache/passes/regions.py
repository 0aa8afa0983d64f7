"""Regions: contiguous runs of graph nodes that one module call produced.

``torch.export`` records, on every node, the stack of module calls that produced it
(``node.meta["nn_module_stack"]``: key -> (qualified name, type)). A *region* is the set of
nodes under one stack key, i.e. one call of one module. The passes only work with regions
that are contiguous in the graph, so that a region can be cut out and replaced by one call.
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import fx

# Ops along which a block's input can reach its output unchanged in shape: the
# residual ("skip") path of a transformer block goes through these.
_STREAM_OPS = {
    torch.ops.aten.add.Tensor,
    torch.ops.aten.clamp.default,
    torch.ops.aten.clip.default,
    torch.ops.aten.to.dtype,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.cat.default,
    torch.ops.aten.split.Tensor,
    torch.ops.aten.split_with_sizes.default,
    torch.ops.aten.contiguous.default,
    operator.getitem,
    operator.add,
}


def is_compute_node(node: fx.Node) -> bool:
    """Nodes that belong to regions: everything but placeholders, attributes and the output."""
    return node.op in ("call_function", "call_method", "call_module")


def compute_order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Each compute node's position among the compute nodes of ``gm``, in graph order."""
    return {n: i for i, n in enumerate(n for n in gm.graph.nodes if is_compute_node(n))}


@dataclass
class Region:
    """One call of one module, as a contiguous span of graph nodes.

    Attributes:
        name: qualified module name (``transformer_blocks.3`` or ``transformer_blocks.3.attn1``).
        key: the ``nn_module_stack`` key of that call (distinguishes repeated calls).
        module_type: the module's class, as recorded by export.
        nodes: the region's nodes in graph order.
        inputs: nodes outside the region that it reads (parameters excluded), in first-use order.
        outputs: region nodes read outside the region, in graph order.
        streams: for each output index, the input index of its residual stream, if any.
    """

    name: str
    key: str
    module_type: str
    nodes: list[fx.Node]
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)
    streams: dict[int, int] = field(default_factory=dict)
    reason: str | None = None  # why the region is not eligible, None when it is
    submodules: list["Region"] = field(default_factory=list)
    #: For an attention sub-module: whether it attends to another sequence (the text), as the
    #: module itself says (diffusers' ``is_cross_attention``); None where it does not say.
    cross_attention: bool | None = None

    @property
    def eligible(self) -> bool:
        return self.reason is None

    @property
    def is_residual(self) -> bool:
        """Every output is its input stream plus something: the block form caches need."""
        return bool(self.outputs) and len(self.streams) == len(self.outputs)


def tensor_meta(node: fx.Node) -> torch.Tensor | None:
    """The fake tensor that export recorded for ``node``, if it produced one tensor."""
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


#: The reason a region is refused when its shapes depend on tensor values.
DATA_DEPENDENT_SHAPE = "its output's shape depends on tensor values (a size torch.export could not fix)"


def has_static_shape(value: torch.Tensor) -> bool:
    """Whether every size of ``value`` is a plain integer. A graph captured around a
    data-dependent size (``nonzero``, a boolean mask) carries a symbol there instead, and
    comparing one would ask the exporter's shape environment a question it cannot answer."""
    return all(isinstance(size, int) for size in value.shape)


def _same_kind(a: fx.Node, b: fx.Node) -> bool:
    ta, tb = tensor_meta(a), tensor_meta(b)
    if ta is None or tb is None or not has_static_shape(ta) or not has_static_shape(tb):
        return False
    return ta.shape == tb.shape and ta.dtype == tb.dtype


def _find_stream(output: fx.Node, inputs: list[fx.Node], members: set[fx.Node]) -> int | None:
    """The input that reaches ``output`` along the residual path (breadth-first, nearest wins)."""
    candidates = [i for i, inp in enumerate(inputs) if _same_kind(inp, output)]
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    wanted = {inputs[i]: i for i in candidates}
    seen: set[fx.Node] = {output}
    queue: deque[fx.Node] = deque([output])
    while queue:
        node = queue.popleft()
        if node in wanted:
            return wanted[node]
        if node is not output and node not in members:
            continue
        if node is not output and node.target not in _STREAM_OPS:
            continue
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                queue.append(arg)
    # Several same-shaped inputs and no residual path found: pair by position.
    return candidates[0]


def build_region(name: str, key: str, module_type: str, nodes: list[fx.Node], order: dict[fx.Node, int]) -> Region:
    """Compute a region's inputs, outputs and streams, and check it can be cut out."""
    region = Region(name=name, key=key, module_type=module_type, nodes=nodes)
    members = set(nodes)
    first, last = order[nodes[0]], order[nodes[-1]]
    if last - first + 1 != len(nodes):
        region.reason = "its nodes are interleaved with nodes of other modules"
        return region
    seen: set[fx.Node] = set()
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in members and arg.op != "get_attr" and arg not in seen:
                seen.add(arg)
                region.inputs.append(arg)
        if any(user not in members for user in node.users):
            region.outputs.append(node)
    if not region.outputs:
        region.reason = "nothing outside it reads its result"
        return region
    for idx, out in enumerate(region.outputs):
        if isinstance(out.meta.get("val"), torch.SymInt):  # a size computed from a data-dependent one
            region.reason = DATA_DEPENDENT_SHAPE
            return region
        if tensor_meta(out) is None:
            region.reason = f"output '{out.name}' is not a single tensor"
            return region
        if not has_static_shape(tensor_meta(out)):
            region.reason = DATA_DEPENDENT_SHAPE
            return region
        stream = _find_stream(out, region.inputs, members)
        if stream is not None:
            region.streams[idx] = stream
    return region
