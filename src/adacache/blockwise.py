"""``capture="blocks"``: the model's own code runs eagerly, each run of its blocks is a
captured and rewritten graph.

:func:`compile_blockwise` is :func:`adacache.compiler.compile_graph`'s counterpart for a
model ``torch.export`` cannot capture whole. It records one call to find the runs of blocks
(:func:`adacache.capture.blocks.record_block_runs`), captures and rewrites each run with the
same passes (:func:`adacache.compiler.rewrite`), and returns a :class:`CompiledGraph` whose
``graph_module`` is a :class:`BlockRunsGraph`: a callable with the calling convention of a
rewritten graph (user inputs, controls, cache states in; user outputs, states, signals out)
over one :class:`~adacache.passes.CacheLayout` that concatenates the runs' layouts. Sessions,
statistics and request handling therefore do not know which mode ran.

What differs from whole-graph capture: a span cannot reach across two runs (a site per run,
each planned by the policy over its run's blocks); a run whose blocks the policy cannot use
(none eligible, or too few for it) runs uncached, which ``explain`` shows; there is no single
graph to export; a run's tensors may change shape while the model's inputs do not (Lumina2's
packed caption length), so each run keeps one rewritten graph per shape of its outside
tensors, and a cache of other shapes is not reused (that run computes).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .capture import CapturedGraph, InputSignature, capture, signature_of
from .capture.blocks import PendingOutput, RunModule, RunPlan, record_block_runs, routed_copy, routing
from .compiler import CompiledGraph, check_backend, rewrite
from .errors import CaptureError, NotEligibleError, PolicyError
from .passes import CacheLayout
from .passes.find_blocks import candidate_block_names
from .policies.base import Policy


@dataclass
class RunGraph:
    """One run's graph for one shape of its outside tensors.

    ``compiled`` is the rewritten graph, or None where the run runs uncached (``reason``
    says why); ``middle`` holds each call's output leaves as shape-only tensors (meta), the
    stand-ins a reused run hands the model for the blocks it did not run.
    """

    captured: CapturedGraph
    compiled: CompiledGraph | None
    layout: CacheLayout
    middle: list[list[Any]]
    reason: str | None = None

    @property
    def runnable(self) -> Any:
        return self.compiled.graph_module if self.compiled is not None else self.captured.graph_module

    def states_fit(self, states: list[torch.Tensor]) -> bool:
        return all(t.shape == s.shape and t.dtype == s.dtype for t, s in zip(states, self.layout.states))


@dataclass
class BlockRun:
    """A run of blocks: its plan, the module that replays it, its graphs per input shape."""

    plan: RunPlan
    module: RunModule
    prefix: str = ""  # of its site names in the model's layout, when the model has several runs
    graphs: dict[InputSignature, RunGraph] = field(default_factory=dict)
    first: RunGraph | None = None

    @property
    def layout(self) -> CacheLayout:
        assert self.first is not None
        return self.first.layout


def compile_blockwise(
    model: nn.Module,
    policy: Policy,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    blocks: Any = None,
    backend: str = "eager",
) -> CompiledGraph:
    """Record ``model`` on these inputs, then capture and rewrite each run of its blocks.

    Raises:
        NotEligibleError: the model has no candidate blocks, or no run has blocks the policy can cache.
        CaptureError: a run of blocks cannot be captured either (the failing line is inside a block).
    """
    check_backend(backend)
    names = candidate_block_names(model, blocks)
    if not names:
        raise NotEligibleError(
            f"{type(model).__name__} has no transformer blocks to capture one by one (searched `_repeated_blocks` and the "
            "usual block containers); pass blocks= with a glob over qualified module names"
        )
    recording = record_block_runs(model, args, kwargs, names)
    runs = [BlockRun(plan, RunModule(model, plan)) for plan in recording.runs]
    for run, example in zip(runs, recording.examples):
        run.first = _compile_run(run, dense(example), policy, backend)
        run.graphs[signature_of(tuple(example), {})] = run.first
    cached = [run for run in runs if run.first.compiled is not None]
    if not cached:
        reasons = "; ".join(f"{run.plan.describe()}: {run.first.reason}" for run in runs)
        raise NotEligibleError(f"no run of {type(model).__name__}'s blocks can be cached: {reasons}")
    if len(cached) > 1:
        for r, run in enumerate(cached):
            run.prefix = f"run{r}_"
    flat_inputs, in_spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    layout = _joined_layout(runs, len(flat_inputs), recording.num_outputs)
    graph = BlockRunsGraph(model, names, runs, in_spec, recording.out_spec, layout, policy, backend)
    captured = CapturedGraph(None, in_spec, recording.out_spec, signature_of(args, kwargs))  # type: ignore[arg-type]
    found = [block for run in cached for block in run.first.compiled.blocks]
    return CompiledGraph(captured, None, graph, layout, found, None, backend, runs=runs)  # type: ignore[arg-type]


def dense(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The run's outside tensors as its graph takes them: contiguous. A run's input is often
    a view the model made (a transposed patch embedding), and Inductor compiles a cond branch
    for the layout it traced, which a view of another layout would not match."""
    return [t.contiguous() for t in tensors]


def _compile_run(run: BlockRun, externals: list[torch.Tensor], policy: Policy, backend: str) -> RunGraph:
    captured = capture(run.module, tuple(externals), {})
    middle = _middle_outputs(run.module, externals)
    try:
        compiled = rewrite(captured, run.module, policy, blocks=run.plan.names, backend=backend)
    except (NotEligibleError, PolicyError) as exc:
        first_line = str(exc).splitlines()[0]
        layout = CacheLayout(num_user_inputs=len(externals), num_user_outputs=len(list(captured.graph_module.graph.output_node().args[0])))
        return RunGraph(captured, None, layout, middle, reason=f"runs uncached ({type(exc).__name__}: {first_line})")
    return RunGraph(captured, compiled, compiled.layout, middle)


def _middle_outputs(module: RunModule, externals: list[torch.Tensor]) -> list[list[Any]]:
    """Each call's output leaves as meta tensors (shape, dtype) - found on fake tensors, so
    nothing is computed - and the device the real ones have."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        outputs = module.forward_all(*(mode.from_tensor(t) for t in externals))
    return [
        [_ShapeOnly(t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else t for t in pytree.tree_leaves(out)]
        for out in outputs
    ]


@dataclass(frozen=True)
class _ShapeOnly:
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


def _joined_layout(runs: list[BlockRun], num_inputs: int, num_outputs: int) -> CacheLayout:
    """The runs' layouts as one, in run order; site names get their run's prefix."""
    layout = CacheLayout(num_user_inputs=num_inputs, num_user_outputs=num_outputs)
    orders = {run.layout.forecast_order for run in runs if run.layout.forecast_order}
    if len(orders) > 1:
        raise CaptureError(f"the runs of blocks were planned with different forecast orders {sorted(orders)}")
    layout.forecast_order = orders.pop() if orders else 0
    for run in runs:
        names = {site.name: run.prefix + site.name for site in run.layout.sites}
        for site in run.layout.sites:
            renamed = dataclasses.replace(site, name=names[site.name])
            renamed.renamed_sites(names)
            layout.sites.append(renamed)
        layout.controls += [dataclasses.replace(c, name=run.prefix + c.name, site=names[c.site])
                            for c in run.layout.controls if c.kind == "allow"]
        layout.states += [dataclasses.replace(s, name=run.prefix + s.name, site=names[s.site]) for s in run.layout.states]
        layout.signals += [dataclasses.replace(s, name=run.prefix + s.name, site=names[s.site]) for s in run.layout.signals]
    if layout.forecast_order:
        forecast = next(run.layout.controls for run in runs if run.layout.forecast_order)
        layout.controls = [c for c in forecast if c.kind != "allow"] + layout.controls
    return layout


class BlockRunsGraph:
    """A compiled model in blocks mode, called as a rewritten graph is:
    ``(*user inputs, *controls, *states) -> (*user outputs, *states, *signals)``.

    Each call runs the model's own ``forward`` on a routed copy (same weights; one per thread,
    since the model's code may write to its modules while it runs); its block calls come to a
    :class:`_CallRouter`, which runs each run's graph at the run's first call and hands the
    model stand-ins for the outputs in the middle of the run.
    """

    def __init__(self, model: nn.Module, names: list[str], runs: list[BlockRun], in_spec: pytree.TreeSpec,
                 out_spec: pytree.TreeSpec, layout: CacheLayout, policy: Policy, backend: str) -> None:
        self.model, self.names, self.runs = model, names, runs
        self._copies = threading.local()
        self.in_spec, self.out_spec, self.layout = in_spec, out_spec, layout
        self.policy, self.backend = policy, backend
        #: (run, call within the run) of every block call, in the order the model makes them.
        self.calls = [(r, i) for r, run in enumerate(runs) for i in range(len(run.plan.calls))]
        self._lock = threading.Lock()

    def __call__(self, *flat: Any) -> tuple[Any, ...]:
        n_in, n_controls = self.layout.num_user_inputs, len(self.layout.controls)
        args, kwargs = pytree.tree_unflatten(list(flat[:n_in]), self.in_spec)
        router = _CallRouter(self, list(flat[n_in : n_in + n_controls]), list(flat[n_in + n_controls :]))
        with routing(router):
            result = self.routed()(*args, **kwargs)
        router.finish()
        leaves, spec = pytree.tree_flatten(result)
        if spec != self.out_spec:
            raise CaptureError(f"{type(self.model).__name__} returned {spec} where the recorded call returned {self.out_spec}")
        return (*leaves, *router.states, *router.signals)

    def routed(self) -> nn.Module:
        """This thread's routed copy of the model (made at its first call, about a millisecond)."""
        copy = getattr(self._copies, "model", None)
        if copy is None:
            copy = self._copies.model = routed_copy(self.model, self.names)
        return copy

    def graph_for(self, run: BlockRun, externals: list[torch.Tensor]) -> RunGraph:
        """The run's graph for these outside tensors, captured now if their shapes are new."""
        key = signature_of(tuple(externals), {})
        graph = run.graphs.get(key)
        if graph is None:
            with self._lock:
                graph = run.graphs.get(key)
                if graph is None:
                    graph = _compile_run(run, externals, self.policy, self.backend)
                    _check_same_layout(run, graph)
                    run.graphs[key] = graph
        return graph


def _check_same_layout(run: BlockRun, graph: RunGraph) -> None:
    def shape_free(layout: CacheLayout) -> list[Any]:
        return [[(s.name, s.role) for s in layout.states], [c.name for c in layout.controls], [s.name for s in layout.signals]]

    if shape_free(graph.layout) != shape_free(run.layout):
        raise CaptureError(
            f"the blocks {run.plan.describe()} were planned differently at a new input shape; capture='blocks' needs the "
            "same cache sites at every shape of a run"
        )


class _CallRouter:
    """The block calls of one model call, checked against the recorded ones and served by
    the runs' graphs."""

    def __init__(self, graph: BlockRunsGraph, controls: list[torch.Tensor], states: list[torch.Tensor]) -> None:
        self.graph = graph
        self.position = 0
        self.controls = _split_controls(graph, controls)
        self.states_in = _split(states, [len(run.layout.states) for run in graph.runs])
        self.states: list[torch.Tensor] = []
        self.signals: list[torch.Tensor] = []
        self.externals: list[Any] = []
        self.output: Any = None
        self.middle: list[list[Any]] = []
        self.stand_ins: list[list[Any]] = []

    def __call__(self, name: str, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        graph = self.graph
        if self.position >= len(graph.calls):
            raise self._differs(f"it called block {name!r} after the {len(graph.calls)} block calls it was recorded with")
        r, i = graph.calls[self.position]
        self.position += 1
        run = graph.runs[r]
        call = run.plan.calls[i]
        if call.name != name:
            raise self._differs(f"block call {self.position} was {call.name!r} when recorded and is {name!r} now")
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != call.in_spec:
            raise self._differs(f"block {name!r} was called with inputs of another structure ({spec}, recorded {call.in_spec})")
        if i == 0:
            self.externals = [None] * run.plan.num_externals
        self._check_inputs(name, call, leaves, first=i == 0)
        if i == 0:
            self._run(r, run)
        if i == len(run.plan.calls) - 1:
            return self.output
        stand_ins = [PendingOutput(m.shape, m.dtype, m.device, name) if isinstance(m, _ShapeOnly) else m
                     for m in self.middle[i]]
        self.stand_ins.append(stand_ins)
        return pytree.tree_unflatten(stand_ins, call.out_spec)

    def _check_inputs(self, name: str, call: Any, leaves: list[Any], *, first: bool) -> None:
        for template, value in zip(call.leaves, leaves):
            if template.kind == "external":
                known = self.externals[template.index]
                if not isinstance(value, torch.Tensor) or isinstance(value, PendingOutput):
                    raise self._differs(f"block {name!r} was given {type(value).__name__} where the recorded call gave a tensor")
                if first and known is None:
                    self.externals[template.index] = value
                elif value is not known:
                    raise self._differs(f"block {name!r} was given another tensor than the other blocks of its run")
            elif template.kind == "link":
                if value is not self.stand_ins[template.call][template.index]:
                    raise self._differs(f"block {name!r} did not get the output of the block before it")
            elif not _same_value(value, template.value):
                raise self._differs(f"block {name!r} was given {value!r} where the recorded call gave {template.value!r}")

    def _run(self, r: int, run: BlockRun) -> None:
        externals = dense(self.externals)
        graph = self.graph.graph_for(run, externals)
        states = self.states_in[r]
        if not graph.states_fit(states):  # a cache from another shape of this run is never reused
            states = graph.layout.initial_state(externals[0].device)
        outputs = graph.runnable(*externals, *self.controls[r], *states)
        n_out, n_states = graph.layout.num_user_outputs, len(graph.layout.states)
        self.output = graph.captured.unflatten_outputs(list(outputs[:n_out]))
        self.states += list(outputs[n_out : n_out + n_states])
        self.signals += list(outputs[n_out + n_states :])
        self.middle = graph.middle
        self.stand_ins = []

    def finish(self) -> None:
        if self.position != len(self.graph.calls):
            raise self._differs(f"it made {self.position} block calls; it was recorded making {len(self.graph.calls)}")

    def _differs(self, what: str) -> CaptureError:
        return CaptureError(
            f"{type(self.graph.model).__name__} called its blocks differently from the call capture='blocks' recorded: "
            f"{what}. Its runs of blocks were captured from that call; compile it with blocks= naming the blocks it "
            "always calls the same way"
        )


def _split(values: list[Any], sizes: list[int]) -> list[list[Any]]:
    out, start = [], 0
    for size in sizes:
        out.append(values[start : start + size])
        start += size
    return out


def _split_controls(graph: BlockRunsGraph, controls: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Each run's controls: the shared forecast controls where it forecasts, then its flags."""
    n_forecast = sum(1 for c in graph.layout.controls if c.kind != "allow")  # the joined layout puts them first
    forecast, flags = controls[:n_forecast], controls[n_forecast:]
    per_run = _split(flags, [sum(1 for c in run.layout.controls if c.kind == "allow") for run in graph.runs])
    return [(forecast if run.layout.forecast_order else []) + own for run, own in zip(graph.runs, per_run)]


def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not the same
        return False

