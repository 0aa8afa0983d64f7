"""Pass 2 (outline): cut a contiguous region out into its own GraphModule.

The region's nodes move into a child ``GraphModule`` and the parent calls it once with a
``call_module`` node. Parameters stay owned by the parent and are passed to the child as
explicit arguments (after the region's inputs): a child that is a pure function of its
arguments can become a ``cond`` branch that ``torch.export`` and the ONNX exporter accept.
This is the step that lets a cache node decide, at run time, whether the region runs.
"""

from __future__ import annotations

import operator

from torch import fx, nn

from .regions import Region


def region_parameters(region: Region) -> list[fx.Node]:
    """The ``get_attr`` nodes (parameters, buffers, constants) a region reads, in first-use order."""
    seen: dict[fx.Node, None] = {}
    for node in region.nodes:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                seen.setdefault(arg, None)
    return list(seen)


def _move_in_front(graph: fx.Graph, attributes: list[fx.Node], first: fx.Node) -> None:
    """Move the ``get_attr`` nodes that stand inside the region (torch.export places those of
    a block's attention score and mask functions where they are used) in front of it: the
    call that replaces the region reads them."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    for attribute in attributes:
        if position[attribute] > position[first]:
            first.prepend(attribute)


def outline_region(gm: fx.GraphModule, region: Region, name: str) -> fx.Node:
    """Replace ``region`` in ``gm`` by ``call_module(name)``; return the new call node.

    The call takes ``(*region.inputs, *region_parameters(region))`` and returns a tuple of
    the region's outputs in ``region.outputs`` order; every former use of an output now
    reads a ``getitem`` of the call. ``region.nodes`` are erased from ``gm``.
    """
    members = set(region.nodes)
    params = region_parameters(region)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for inp in [*region.inputs, *params]:
        ph = sub.placeholder(inp.name)
        ph.meta = dict(inp.meta)
        env[inp] = ph

    def lookup(arg: fx.Node) -> fx.Node:
        if arg in env:
            return env[arg]
        raise AssertionError(f"region {region.name} reads {arg.name}, which is neither an input nor a member")

    for node in region.nodes:
        env[node] = sub.node_copy(node, lookup)
    sub.output(tuple(env[o] for o in region.outputs))
    child = fx.GraphModule(nn.Module(), sub, class_name=name)
    gm.add_submodule(name, child)

    graph = gm.graph
    _move_in_front(graph, params, region.nodes[0])
    with graph.inserting_before(region.nodes[0]):
        call = graph.call_module(name, (*region.inputs, *params))
        call.meta["nn_module_stack"] = dict(region.nodes[0].meta.get("nn_module_stack") or {})
        call.meta["adacache_region"] = region.name
        for idx, out in enumerate(region.outputs):
            item = graph.call_function(operator.getitem, (call, idx))
            # The call's results live outside the region: drop the region tag.
            item.meta = {k: v for k, v in out.meta.items() if k != "adacache_region"}
            out.replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
    for node in reversed(region.nodes):
        graph.erase_node(node)
    return call
