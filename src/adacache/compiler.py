"""The compile pipeline, in the order it runs.

:func:`compile_graph` is the whole of what ``adacache.compile`` does to a model for one
input signature; the runtime (:mod:`adacache.runtime.program`) calls it on a model's first
call with new shapes and keeps the result. Each step is one function with one job:

1. :func:`~adacache.capture.capture` - ``torch.export`` of the model on these inputs, and
   :func:`~adacache.passes.drop_noop_squeezes` - squeezes that remove nothing (which ONNX refuses),
   :func:`~adacache.passes.spell_boolean_selects` - boolean selects as logic (which ONNX Runtime cannot run);
2. :func:`~adacache.passes.find_blocks` - annotate the transformer blocks;
3. ``policy.plan`` - the policy describes its cache sites (:mod:`adacache.passes.contract`);
4. :func:`~adacache.passes.outline_sites` - cut each site out into a child module;
5. :func:`~adacache.passes.insert_cache_nodes` - cache state in and out, a ``cond`` per site;
   :func:`~adacache.passes.require_finite_inputs` - non-finite inputs always compute;
6. :func:`lower` - for eager PyTorch or ``torch.compile``. ONNX and TensorRT lower the
   ``portable`` graph later, through ``adacache.export``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .capture import CapturedGraph, capture
from .passes import (
    CacheLayout,
    Region,
    drop_noop_squeezes,
    find_blocks,
    insert_cache_nodes,
    lower_cond_to_python,
    outline_sites,
    require_finite_inputs,
    spell_boolean_selects,
)
from .passes.lower import bind_operators, drop_state_copies, hoist_attributes, pin_cond_operands
from .policies.base import Policy

#: The backends :func:`lower` knows; deployment formats go through ``adacache.export``.
BACKENDS = ("eager", "inductor")


@dataclass
class CompiledGraph:
    """A model captured on one input signature and rewritten for one policy.

    ``graph_module`` is the backend-ready graph; ``portable`` is the same rewritten graph
    with ``torch.ops.higher_order.cond`` nodes, the form handed to ``torch.compile`` and
    exporters; ``original`` is the captured graph before rewriting (for ``explain``).
    """

    captured: CapturedGraph
    portable: fx.GraphModule
    graph_module: Any
    layout: CacheLayout
    blocks: list[Region]
    original: fx.GraphModule
    backend: str
    runs: list[Any] | None = None

    @property
    def mode(self) -> str:
        """``graph`` (the whole model is one captured graph) or ``blocks``."""
        return "graph" if self.runs is None else "blocks"


def compile_graph(
    model: nn.Module,
    policy: Policy,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    blocks: Any = None,
    backend: str = "eager",
) -> CompiledGraph:
    """Capture ``model`` on these inputs and rewrite it for ``policy``, lowered for ``backend``."""
    check_backend(backend)
    captured = capture(model, args, kwargs)
    return rewrite(captured, model, policy, blocks=blocks, backend=backend)


def rewrite(captured: CapturedGraph, model: nn.Module, policy: Policy, *, blocks: Any = None, backend: str = "eager") -> CompiledGraph:
    """Steps 2-6 on a captured graph of ``model`` (or of a run of its blocks)."""
    gm = spell_boolean_selects(drop_noop_squeezes(captured.graph_module))
    found = find_blocks(gm, model, blocks)
    original = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # after annotation: "before" shows the blocks found
    sites = policy.plan(found)
    outline_sites(gm, sites)
    insert_cache_nodes(gm, sites)
    require_finite_inputs(gm)
    return CompiledGraph(captured, gm, lower(gm, backend), gm.meta["adacache"], found, original, backend)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use 'eager' or 'inductor' (ONNX / TensorRT go through adacache.export)")


def lower(gm: fx.GraphModule, backend: str) -> Any:
    """The rewritten graph made runnable: Python control flow for eager PyTorch (on a copy;
    ``gm`` stays portable), or ``torch.compile`` with Inductor."""
    check_backend(backend)
    if backend == "eager":
        return hoist_attributes(bind_operators(drop_state_copies(lower_cond_to_python(copy_graph_module(gm)))))
    return torch.compile(pin_cond_operands(copy_graph_module(gm)), backend="inductor", dynamic=False, fullgraph=True)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph; submodules and parameters are shared."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    return new
