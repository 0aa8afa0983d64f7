"""Pass 2a (hoist probe): copy the computation of a probe value out in front of its site.

TeaCache decides from the timestep-modulated input of the first block, a value computed
*inside* the span it may skip. This pass copies the few nodes that compute it (layer norm
and adaLN modulation of the first block: cheap) in front of the span, so the decision can
be taken before the span runs; the originals stay in the span and run only when it does.
"""

from __future__ import annotations

from torch import fx

from .regions import Region


def hoist_probe(gm: fx.GraphModule, region: Region, probe: fx.Node) -> fx.Node:
    """Copy ``probe`` and the region nodes it depends on before ``region``; return the copy."""
    members = set(region.nodes)
    needed: set[fx.Node] = set()
    stack = [probe]
    while stack:
        node = stack.pop()
        if node in needed or node not in members:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    env: dict[fx.Node, fx.Node] = {}
    graph = gm.graph
    with graph.inserting_before(region.nodes[0]):
        for node in region.nodes:  # graph order is a topological order
            if node in needed:
                copy = graph.node_copy(node, lambda arg: env.get(arg, arg))
                copy.meta = {k: v for k, v in node.meta.items() if k != "adacache_region"}
                env[node] = copy
    graph.lint()
    return env[probe]
