"""Pass 3a (outline): cut a contiguous region out into its own GraphModule.

The region's nodes move into a child ``GraphModule`` (sharing the parent's parameters by
reference, no copies) and the parent calls it once with a ``call_module`` node. This is
the step that lets a cache node decide, at run time, whether the region runs at all.
"""

from __future__ import annotations

import operator

from torch import fx

from .regions import Region


def outline_region(gm: fx.GraphModule, region: Region, name: str) -> fx.Node:
    """Replace ``region`` in ``gm`` by ``call_module(name)``; return the new call node.

    The call returns a tuple of the region's outputs in ``region.outputs`` order; every
    former use of an output now reads a ``getitem`` of the call. ``region.nodes`` are
    erased from ``gm``; parameters only they used are removed from ``gm`` (the child
    keeps them).
    """
    members = set(region.nodes)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for inp in region.inputs:
        ph = sub.placeholder(inp.name)
        ph.meta = dict(inp.meta)
        env[inp] = ph

    attr_nodes: dict[str, fx.Node] = {}

    def lookup(arg: fx.Node) -> fx.Node:
        if arg in env:
            return env[arg]
        if arg.op == "get_attr":
            if arg.target not in attr_nodes:
                node = sub.get_attr(arg.target)
                node.meta = dict(arg.meta)
                attr_nodes[arg.target] = node
            return attr_nodes[arg.target]
        raise AssertionError(f"region {region.name} reads {arg.name}, which is neither an input nor a member")

    for node in region.nodes:
        env[node] = sub.node_copy(node, lookup)
    sub.output(tuple(env[o] for o in region.outputs))
    child = fx.GraphModule(gm, sub, class_name=name)
    gm.add_submodule(name, child)

    graph = gm.graph
    with graph.inserting_before(region.nodes[0]):
        call = graph.call_module(name, tuple(region.inputs))
        call.meta["nn_module_stack"] = dict(region.nodes[0].meta.get("nn_module_stack") or {})
        call.meta["adacache_region"] = region.name
        for idx, out in enumerate(region.outputs):
            item = graph.call_function(operator.getitem, (call, idx))
            # The call's results live outside the region: drop the region tag.
            item.meta = {k: v for k, v in out.meta.items() if k != "adacache_region"}
            out.replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
    for node in reversed(region.nodes):
        graph.erase_node(node)
    _drop_unused_attributes(gm)
    return call


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Erase get_attr nodes nobody reads, and the parent's references to their tensors."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            target = str(node.target)
            gm.graph.erase_node(node)
            owner_path, _, attr = target.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            if hasattr(owner, attr) and not isinstance(getattr(owner, attr), fx.GraphModule):
                delattr(owner, attr)
