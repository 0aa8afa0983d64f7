"""Pass 0b (clean): spell selections between boolean tensors with logic operators.

``masked_fill`` and ``where`` on boolean tensors (HunyuanVideo combines its attention masks
with ``mask.masked_fill(~keep, False)``) become ONNX ``Where`` nodes over booleans, for which
ONNX Runtime has no kernel: the exported file does not load. On booleans the same selection
is plain logic, ``where(c, a, b) = (c and a) or (not c and b)``, which every backend runs.
The computation is unchanged (bit for bit: these are booleans).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .regions import tensor_meta

_AND, _OR, _NOT = torch.ops.aten.logical_and.default, torch.ops.aten.logical_or.default, torch.ops.aten.logical_not.default
_MASKED_FILLS = (torch.ops.aten.masked_fill.Scalar, torch.ops.aten.masked_fill.Tensor)
_WHERES = (torch.ops.aten.where.self,)


def spell_boolean_selects(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace each ``masked_fill`` / ``where`` whose result is boolean by logic operators."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (*_MASKED_FILLS, *_WHERES):
            continue
        value = tensor_meta(node)
        if value is None or value.dtype != torch.bool:
            continue
        with gm.graph.inserting_before(node):
            if node.target in _MASKED_FILLS:
                source, mask, fill = node.args[:3]
                spelled = _select(gm.graph, mask, fill, source)
            else:
                spelled = _select(gm.graph, *node.args[:3])
        if spelled is None:
            continue
        spelled.meta = dict(node.meta)
        node.replace_all_uses_with(spelled)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _select(graph: fx.Graph, condition: Any, when_true: Any, when_false: Any) -> fx.Node | None:
    """``condition ? when_true : when_false`` for booleans, where each value is a node or a
    Python bool (None: a value of another kind, left as it was)."""
    if isinstance(when_true, bool) and isinstance(when_false, bool):
        return None  # a constant select: not produced by the exporter for the cases above
    if isinstance(when_true, bool):  # c ? True : b = c or b;  c ? False : b = not c and b
        if when_true:
            return graph.call_function(_OR, (condition, when_false))
        return graph.call_function(_AND, (graph.call_function(_NOT, (condition,)), when_false))
    if isinstance(when_false, bool):  # c ? a : True = not c or a;  c ? a : False = c and a
        if when_false:
            return graph.call_function(_OR, (graph.call_function(_NOT, (condition,)), when_true))
        return graph.call_function(_AND, (condition, when_true))
    if not isinstance(when_true, fx.Node) or not isinstance(when_false, fx.Node):
        return None
    keep = graph.call_function(_AND, (condition, when_true))
    other = graph.call_function(_AND, (graph.call_function(_NOT, (condition,)), when_false))
    return graph.call_function(_OR, (keep, other))
