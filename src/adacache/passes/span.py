"""Pass 2a (span): make the nodes of a multi-block site one contiguous run of the graph.

A span caches several blocks as one site. Real models put code between their blocks:
``h = h + block(h)`` loops, the concatenation of the text and image streams between
AuraFlow's or Flux's joint and single blocks, the reshapes between a video model's spatial
and temporal blocks, an auxiliary stack (control, VACE) whose outputs are added in. A span
over the blocks alone is then interleaved with that code and cannot be cut out. The span
therefore becomes the *hull* of its blocks: every node from the first block's first node to
the last block's last node. In it:

* *glue* that depends on a block's result (the residual add, the concatenation) belongs to
  the span: it is part of what a reuse skips and what the cache stands for;
* nodes that do not depend on any block of the span (a rotary embedding computed between
  blocks, a mask) are moved in front of the span, so that a reuse still computes them for
  whoever reads them later;
* when a span ends in a result no input has the shape of (the joint stream that the model
  slices back into image tokens after the last block), the trailing slices are taken into
  the span, so that its outputs become residual streams of its inputs again.

The pass changes no computation: it only reorders independent nodes and chooses the nodes
of the site.
"""

from __future__ import annotations

from torch import fx

from .regions import _STREAM_OPS, Region, build_region, compute_order, is_compute_node

# How many trailing slicing nodes a span may take in to end on its inputs' shapes.
_MAX_TRAILING = 8


def span_hull(gm: fx.GraphModule, members: list[fx.Node]) -> list[fx.Node]:
    """The contiguous run of nodes a site over ``members`` must cover, in graph order.

    Moves the nodes inside the hull that do not depend on ``members`` in front of it (a
    topological order is kept: each moved node only reads nodes before the hull or moved
    before it). Returns ``members`` plus the glue that depends on them.
    """
    order = compute_order(gm)
    member_set = set(members)
    ordered = sorted(member_set, key=order.__getitem__)
    if order[ordered[-1]] - order[ordered[0]] + 1 == len(ordered):
        return ordered
    nodes = list(gm.graph.nodes)
    hull = nodes[nodes.index(ordered[0]) : nodes.index(ordered[-1]) + 1]
    inside: list[fx.Node] = []
    dependent: set[fx.Node] = set()
    independent: list[fx.Node] = []
    for node in hull:
        if is_compute_node(node) and (node in member_set or any(arg in dependent for arg in node.all_input_nodes)):
            dependent.add(node)
            inside.append(node)
        else:
            independent.append(node)
    anchor = hull[0]
    for node in independent:
        anchor.prepend(node)  # in graph order, so every moved node follows what it reads
    gm.graph.lint()
    return inside


def take_trailing_slices(gm: fx.GraphModule, region: Region, name: str, key: str, module_type: str) -> Region:
    """Grow ``region`` over the slicing nodes right after it until each output has a stream.

    A user of an output without a stream is taken in when it is a stream op (slice, split,
    getitem, ...) that reads only the region and nodes before it; it moves to just after the
    region (safe: everything it reads is already computed there).
    """
    for _ in range(_MAX_TRAILING):
        if not region.eligible or region.is_residual:
            return region
        missing = [o for i, o in enumerate(region.outputs) if i not in region.streams]
        members = set(region.nodes)
        order = compute_order(gm)
        start = order[region.nodes[0]]
        taken = None
        for out in missing:
            for user in sorted(out.users, key=lambda u: order.get(u, -1)):
                if user in members or user.op != "call_function" or user.target not in _STREAM_OPS:
                    continue
                if all(arg in members or (arg in order and order[arg] < start) or not is_compute_node(arg)
                       for arg in user.all_input_nodes):
                    taken = user
                    break
            if taken is not None:
                break
        if taken is None:
            return region
        region.nodes[-1].append(taken)
        nodes = [*region.nodes, taken]
        region = build_region(name, key, module_type, nodes, compute_order(gm))
    return region
