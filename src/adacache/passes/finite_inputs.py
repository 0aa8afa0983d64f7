"""Pass 4: a call whose inputs are not finite computes every site.

A reused site returns features from an earlier step, so a NaN or an infinity that enters the
model at a reuse step would never reach the output: the result would look finite while the
model's own would not. This pass makes each site's reuse predicate also require that every
floating user input of the call is finite; when one is not, every site computes and the
output is exactly the model's (non-finite) output. The non-finite features then stored are
refused by the cache's own validity check at the next step.

One check per call, not per site: a sum per floating input (inputs are small beside the
blocks' activations), fused by inductor and two ONNX nodes per input in an engine.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .. import ops
from .insert_cache import META_KEY, CacheLayout
from .regions import tensor_meta


def require_finite_inputs(gm: fx.GraphModule) -> fx.GraphModule:
    """AND ``all_finite(floating user inputs)`` into every cached site's reuse predicate.

    Expects :func:`insert_cache_nodes` to have run (it reads ``gm.meta["adacache"]``). The
    guarded predicate also replaces the plain one as the ``reused`` signal, so the runtime's
    counts say what happened.
    """
    layout: CacheLayout = gm.meta[META_KEY]
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    floating = [
        n for n in placeholders[: layout.num_user_inputs]
        if (meta := tensor_meta(n)) is not None and meta.dtype.is_floating_point
    ]
    conds = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.higher_order.cond and META_KEY in n.meta]
    if not floating or not conds:
        return gm
    with graph.inserting_after(placeholders[-1]):
        finite = graph.call_function(ops.all_finite, tuple(floating))
    finite._rename("user_inputs_finite")
    for cond in conds:
        pred = cond.args[0]
        with graph.inserting_before(cond):
            guarded = graph.call_function(operator.and_, (pred, finite))
        guarded._rename(pred.name.removesuffix("_pred") + "_if_finite")
        pred.replace_all_uses_with(guarded, delete_user_cb=lambda user, guarded=guarded: user is not guarded)
    graph.lint()
    gm.recompile()
    return gm
