"""Pass 0 (clean): drop ``squeeze`` calls on dimensions that are not of size 1.

PyTorch treats ``x.squeeze(1)`` on a dimension of size 64 as a no-op; ONNX's ``Squeeze``
requires each listed axis to be 1, so torch.onnx writes a node ONNX Runtime refuses to load
(PixArt squeezes its caption embedding this way). The captured graph has static shapes, so
whether a squeeze does anything is known here: a squeeze that removes nothing is replaced by
its input, and one that lists some real size-1 dimensions keeps only those. The
computation is unchanged.
"""

from __future__ import annotations

import torch
from torch import fx

from .regions import tensor_meta

_SQUEEZES = (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims)


def drop_noop_squeezes(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace each ``squeeze.dim`` / ``squeeze.dims`` that removes nothing by its input,
    and narrow a ``squeeze.dims`` to the listed dimensions that are of size 1."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SQUEEZES:
            continue
        value = tensor_meta(node.args[0])
        if value is None:
            continue
        listed = node.args[1] if node.target is torch.ops.aten.squeeze.dims else [node.args[1]]
        dims = [d % value.dim() for d in listed] if value.dim() else []
        kept = [d for d in dims if value.shape[d] == 1]
        if len(kept) == len(dims):
            continue
        changed = True
        if kept:
            node.target, node.args = torch.ops.aten.squeeze.dims, (node.args[0], kept)
        else:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
