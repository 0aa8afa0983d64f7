"""Pass 4 (lower): adapt the portable cached graph to one backend.

The cache pass leaves ``torch.ops.higher_order.cond`` nodes, which ``torch.export``,
``torch.compile`` and the ONNX exporter understand. Called eagerly, that operator goes
through dispatcher machinery that costs hundreds of microseconds per call, which is the
whole budget of a cache decision on a small block. For eager execution the cond is
lowered to :func:`branch`, a plain Python ``if`` on the 0-d predicate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx


def branch(pred: torch.Tensor, true_fn: Callable[..., Any], false_fn: Callable[..., Any], operands: Sequence[Any]) -> Any:
    """Run exactly one of the two branches, as ``torch.cond`` does, without its dispatch cost."""
    return true_fn(*operands) if bool(pred) else false_fn(*operands)


def lower_cond_to_python(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every ``higher_order.cond`` node with :func:`branch` (for the eager backend)."""
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.higher_order.cond:
            node.target = branch
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def raise_python_branch_to_cond(gm: fx.GraphModule) -> fx.GraphModule:
    """The inverse of :func:`lower_cond_to_python`, for handing an eager graph to export."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is branch:
            node.target = torch.ops.higher_order.cond
    gm.graph.lint()
    gm.recompile()
    return gm
