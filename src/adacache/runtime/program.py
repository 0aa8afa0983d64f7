"""A *program*: the model captured on one input signature and rewritten for one policy,
with what the runtime keeps beside it (the model fingerprint it was captured from)."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..blockwise import compile_blockwise
from ..compiler import CompiledGraph, compile_graph
from ..passes.contract import SitePlan
from ..policies.base import Policy


@dataclass
class Program(CompiledGraph):
    """Everything the runtime needs to run one input signature (see :class:`CompiledGraph`)."""

    #: What the graph assumed about the model (set by the runtime when it captures).
    fingerprint: Any = field(default=None, repr=False)
    #: The registration epoch at which the fingerprint was last found to match.
    checked_epoch: int = field(default=-1, repr=False)
    #: The attributes every call re-reads (guards.CallWatch), taken when last checked.
    watch: Any = field(default=None, repr=False)
    _flops: dict[str, int] | None = field(default=None, repr=False)

    @property
    def cached_sites(self) -> list[SitePlan]:
        return [s for s in self.layout.sites if s.role == "cached"]

    def initial_state(self, device: torch.device) -> list[torch.Tensor]:
        """Zero caches marked invalid: the first step of a generation computes everything."""
        return self.layout.initial_state(device)

    def site_flops(self) -> dict[str, int | None]:
        """FLOPs of one call of each site and of the whole model, counted once on fake tensors
        (``None`` where a data-dependent op makes them uncountable)."""
        if self._flops is None:
            self._flops = _count_flops(self)
        return self._flops


def build_program(
    model: nn.Module, policy: Policy, args: tuple[Any, ...], kwargs: dict[str, Any], *, capture: str = "graph", **options: Any
) -> Program:
    """Run the compile pipeline for these inputs: :func:`adacache.compiler.compile_graph`
    (``capture="graph"``) or :func:`adacache.blockwise.compile_blockwise` (``"blocks"``),
    which take ``blocks`` and ``backend`` as ``options``."""
    compile_model = compile_blockwise if capture == "blocks" else compile_graph
    graph = compile_model(model, policy, args, kwargs, **options)
    return Program(**{f.name: getattr(graph, f.name) for f in dataclasses.fields(CompiledGraph)})


def _fake_inputs(nodes: list[fx.Node], mode: Any) -> list[Any]:
    out = []
    for node in nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            with mode:  # on the captured device: the parameters it meets are real tensors there
                out.append(torch.empty(val.shape, dtype=val.dtype, device=val.device))
        else:
            out.append(val)
    return out


def _count_flops(program: CompiledGraph) -> dict[str, int | None]:
    """FLOPs per site and for the whole model; ``None`` where they cannot be counted (an op
    whose output shape depends on data, such as ``nonzero``, has no fake-tensor shape; a
    model in blocks mode runs code outside any graph)."""
    if program.runs is not None:
        flops: dict[str, int | None] = {"<model>": None}
        for run in program.runs:
            if run.first.compiled is not None:
                counted = _count_flops(run.first.compiled)
                flops.update({run.prefix + site: value for site, value in counted.items() if site != "<model>"})
        return flops
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    root = program.portable

    def count(module: Any, inputs: list[Any]) -> int | None:
        counter = FlopCounterMode(display=False)
        try:
            with mode, counter, torch.no_grad():
                module(*inputs)
        except (DynamicOutputShapeException, DataDependentOutputException, GuardOnDataDependentSymNode):
            return None
        return counter.get_total_flops()

    # FlopCounterMode tracks modules through autograd hooks, which inference mode forbids:
    # count outside it, so that summary() works inside ``torch.inference_mode()`` blocks.
    with torch.inference_mode(False):
        for site in program.layout.sites:
            region = site.regions[0]
            module = root.get_submodule(site.name)
            params = [operator.attrgetter(target)(root) for target in site.params]
            flops[site.name] = count(module, [*_fake_inputs(region.inputs, mode), *params])
        placeholders = [n for n in program.original.graph.nodes if n.op == "placeholder"]
        flops["<model>"] = count(program.original, list(_fake_inputs(placeholders, mode)))
    return flops
