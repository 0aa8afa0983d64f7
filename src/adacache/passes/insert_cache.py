"""Pass 2 (outline sites) and pass 3 (insert cache nodes).

After this pass the graph is *functional in its cache state*:

    (user inputs, controls, cache_in) -> (user outputs, cache_out, signals)

For every cached site the outlined call becomes

    pred   = allow & valid_in [& each term of the site, in the contract's order]
    result = cond(pred, reuse_branch, compute_branch, (site inputs, cache_in))

where ``reuse_branch`` rebuilds the outputs from the cache as the site's rebuild says
(stale output, residual on the current input, forecast) without running the site, and
``compute_branch`` runs it and refreshes the cache. Each term of
:mod:`adacache.passes.contract` has one lowering here (``_LOWER_TERM``) and declares its own
state (``_TERM_STATE``); the pass composes them and names no caching method. The cond is
``torch.ops.higher_order.cond``, so the same graph exports to ONNX ``If`` and compiles
without re-tracing; the eager backend lowers it to a plain Python branch (see
:mod:`adacache.passes.lower`).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .. import ops
from ..errors import NotEligibleError
from .contract import (
    AccumulatedChange,
    CacheLayout,
    ControlSpec,
    FollowsGate,
    OffsetScore,
    ProbeBelow,
    SignalSpec,
    SitePlan,
    StateSpec,
    TransformationRate,
    graph_name,
)
from .hoist import hoist_probe
from .outline import outline_region, region_parameters
from .regions import Region, build_region, compute_order, tensor_meta
from .span import span_hull, take_trailing_slices


META_KEY = "adacache"
# Marks a copy made only for torch.cond's rules (eager lowering drops it): cache state a branch
# passes through (a branch may not return its inputs), or an output that is a view whose layout
# is not the canonical one (both branches must return the same layout, storage offset and the
# strides of size-1 dimensions included).
STATE_COPY = "adacache_state_copy"


def outline_sites(gm: fx.GraphModule, sites: list[SitePlan]) -> fx.GraphModule:
    """Cut every site's regions out into one child module ``<site.name>`` called once."""
    for site in sites:
        # A span's blocks may have code between them: the site covers their hull.
        nodes = span_hull(gm, [n for region in site.regions for n in region.nodes])
        gate = site.term(AccumulatedChange)
        if gate is not None:  # the measured node must exist before the site's call
            site.with_term(gate, dataclasses.replace(gate, node=hoist_probe(gm, Region(site.label, site.name, "site", nodes), gate.node)))
        region = build_region(site.label, site.name, "site", nodes, compute_order(gm))
        if site.reuse == "residual":
            region = take_trailing_slices(gm, region, site.label, site.name, "site")
        if not region.eligible:
            raise NotEligibleError(
                f"cache site {site.label} cannot be cut out of the graph: {region.reason}. Pass blocks= "
                "to choose other blocks, or a per-block policy (granularity='module' or AdaCorrection)"
            )
        site.regions = (region,)
        site.params = tuple(str(p.target) for p in region_parameters(region))
        outline_region(gm, region, site.name)
    gm.graph.lint()
    gm.recompile()
    return gm


def _site_call(gm: fx.GraphModule, site: SitePlan) -> fx.Node:
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == site.name:
            return node
    raise AssertionError(f"site {site.name} was not outlined")


class _BranchRoot(nn.Module):
    """Owner of a branch graph: holds the outlined site module as ``site``."""

    def __init__(self, site: nn.Module | None) -> None:
        super().__init__()
        if site is not None:
            self.site = site


def _branch(site_module: nn.Module | None, build, n_inputs: int, n_state: int, n_params: int, name: str) -> fx.GraphModule:
    """A cond branch: a pure function of (site inputs, cache, parameters)."""
    graph = fx.Graph()
    inputs = [graph.placeholder(f"in_{i}") for i in range(n_inputs)]
    state = [graph.placeholder(f"cache_{i}") for i in range(n_state)]
    params = [graph.placeholder(f"param_{i}") for i in range(n_params)]
    graph.output(tuple(build(graph, inputs, state, params)))
    return fx.GraphModule(_BranchRoot(site_module), graph, class_name=name)


def _outputs_of(graph: fx.Graph, call: fx.Node, count: int) -> list[fx.Node]:
    return [graph.call_function(operator.getitem, (call, i)) for i in range(count)]


def _score_index(region: Region) -> int:
    """Which input of a site its offset score reads: the residual stream, else the first tensor."""
    if region.streams:
        return region.streams[min(region.streams)]
    return next(i for i, n in enumerate(region.inputs) if tensor_meta(n) is not None)


def _score_input(region: Region, inputs: list[fx.Node]) -> fx.Node:
    return inputs[_score_index(region)]


def _dense(graph: fx.Graph, nodes: list[fx.Node], like: list[fx.Node] | None = None) -> list[fx.Node]:
    """Both branches of a cond must return the same memory layout: contiguous, at storage
    offset 0. ``like`` are the values ``nodes`` compute in the captured graph; a view that
    ``contiguous()`` leaves as it is but whose layout is not the canonical one (the image
    tokens sliced off a joint sequence start past the text; the text tokens of one sample
    keep the joint sequence's batch stride) is copied."""
    dense = []
    for i, node in enumerate(nodes):
        meta = tensor_meta(like[i]) if like is not None else None
        # A non-contiguous value is copied by contiguous() into the canonical layout already.
        if meta is not None and meta.is_contiguous() and not _canonical_layout(meta):
            copy = graph.call_method("clone", (node,), {"memory_format": torch.contiguous_format})
            copy.meta[STATE_COPY] = True
            dense.append(copy)
        else:
            dense.append(graph.call_method("contiguous", (node,)))
    return dense


def _canonical_layout(value: torch.Tensor) -> bool:
    """Storage offset 0 and the strides ``torch.empty`` gives the shape, size-1 dims included
    (``is_contiguous`` ignores those, torch.cond's layout check does not)."""
    stride, expected = 1, []
    for size in reversed(value.shape):
        expected.append(stride)
        stride *= size
    return value.storage_offset() == 0 and tuple(value.stride()) == tuple(reversed(expected))


def _fresh_state(graph: fx.Graph, site: SitePlan, region: Region, inputs: list[fx.Node], outs: list[fx.Node]) -> list[fx.Node]:
    """The cache a computed step leaves behind, in the site's reuse form."""
    return [
        graph.call_function(ops.residual_of, (out, inputs[region.streams[i]])) if _is_residual(site, region, i)
        # The cache must not alias the output it came from (cond branches may not return aliases).
        else graph.call_method("clone", (out,), {"memory_format": torch.contiguous_format})
        for i, out in enumerate(outs)
    ]


def _is_residual(site: SitePlan, region: Region, output: int) -> bool:
    """Whether ``output`` is cached as a residual (``output - stream``) or as itself.

    ``residual`` sites cache each output that has a stream as a residual; an output without
    one (a span ending in a result no input has the shape of) is cached as itself.
    """
    return site.reuse == "residual" and output in region.streams


def _load(graph: fx.Graph, site: SitePlan, region: Region, inputs: list[fx.Node], cached: list[fx.Node], copy: bool) -> list[fx.Node]:
    """The outputs a reuse rebuilds from the cached values (residuals added to their streams)."""
    return [
        graph.call_function(ops.cache_load, (inputs[region.streams[i]], c)) if _is_residual(site, region, i)
        else (graph.call_method("clone", (c,)) if copy else c)
        for i, c in enumerate(cached)
    ]


class _Rewrite:
    """The graph-wide bookkeeping of one insert: new inputs, state, signals, and what sites
    leave for later sites (a probe's score, an accumulated-change verdict)."""

    def __init__(self, gm: fx.GraphModule, sites: list[SitePlan]) -> None:
        self.gm, self.graph = gm, gm.graph
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.output_node = self.graph.output_node()
        self.layout = CacheLayout(num_user_inputs=len(placeholders), num_user_outputs=len(self.output_node.args[0]), sites=list(sites))
        self.last_placeholder = placeholders[-1] if placeholders else None
        self.controls: list[fx.Node] = []
        self.states_in: list[tuple[StateSpec, fx.Node]] = []
        self.new_state: dict[str, fx.Node] = {}
        self.signals: list[fx.Node] = []
        self.forecast: list[fx.Node] = []
        self.probe_gates: dict[str, tuple[fx.Node, fx.Node]] = {}  # probe site -> (score, validity)
        self.probe_state: dict[str, list[tuple[str, fx.Node, fx.Node]]] = {}
        self.change_verdicts: dict[str, fx.Node] = {}  # site -> its accumulated-change verdict

    def placeholder(self, name: str) -> fx.Node:
        """A new graph input after the last one."""
        if self.last_placeholder is None:
            with self.graph.inserting_before(next(iter(self.graph.nodes))):
                node = self.graph.placeholder(name)
        else:
            with self.graph.inserting_after(self.last_placeholder):
                node = self.graph.placeholder(name)
        self.last_placeholder = node
        return node

    def state(self, spec: StateSpec) -> fx.Node:
        """A cache tensor carried between steps: its input now, its output once threaded."""
        node = self.placeholder(spec.name)
        self.states_in.append((spec, node))
        return node

    def control(self, spec: ControlSpec) -> fx.Node:
        node = self.placeholder(spec.name)
        self.controls.append(node)
        self.layout.controls.append(spec)
        return node

    def signal(self, node: fx.Node, site: str, kind: str) -> None:
        # A site can emit two scores (an accumulated-change gate under an offset score): graph
        # outputs need distinct names (ONNX refuses duplicates), so the second gets a suffix.
        base = name = graph_name("signal", site, kind)
        taken = {spec.name for spec in self.layout.signals}
        suffix = 1
        while name in taken:
            name, suffix = f"{base}_{suffix}", suffix + 1
        self.signals.append(node)
        self.layout.signals.append(SignalSpec(name, site, kind))  # type: ignore[arg-type]

    def finish(self) -> fx.GraphModule:
        """Controls before the state inputs; state and signals after the user outputs."""
        layout, graph = self.layout, self.graph
        layout.states = [spec for spec, _ in self.states_in]
        for ctrl in self.controls:
            self.states_in[0][1].prepend(ctrl)
        if self.states_in:  # with nothing cached the graph's signature is the model's own
            # Read the user outputs now: a site whose result is the model's output replaced it.
            user_outputs = tuple(self.output_node.args[0])
            self.output_node.args = (user_outputs + tuple(self.new_state[s.name] for s in layout.states) + tuple(self.signals),)
        self.gm.meta[META_KEY] = layout
        graph.lint()
        self.gm.recompile()
        return self.gm


@dataclass
class _Site:
    """One site while it is rewritten: its call, its inputs and its state inputs."""

    plan: SitePlan
    region: Region
    call: fx.Node
    inputs: list[fx.Node]
    params: list[fx.Node]
    outputs: list[fx.Node]  # the call's getitems, in output order
    cache: list[fx.Node]  # output-major: D_0..D_order of output 0, then output 1, ...
    term_state: dict[type, list[fx.Node]]
    valid: fx.Node

    @property
    def terms_per_output(self) -> int:
        return self.plan.order + 1


def insert_cache_nodes(gm: fx.GraphModule, sites: list[SitePlan]) -> fx.GraphModule:
    """Wrap every outlined site in cache nodes and thread the cache state through the graph.

    Expects :func:`outline_sites` to have run. Records a :class:`CacheLayout` in
    ``gm.meta["adacache"]``. Knows sites only by the contract's words (their role, rebuild
    and terms): no method is named here.
    """
    rewrite = _Rewrite(gm, sites)
    rewrite.layout.forecast_order = max((s.order for s in sites), default=0)
    if rewrite.layout.forecast_order:
        rewrite.forecast = [rewrite.control(ControlSpec(graph_name("forecast", "coef"), "forecast_coef")),
                            rewrite.control(ControlSpec(graph_name("forecast", "update"), "forecast_update"))]
    for plan in sites:
        if plan.role == "fresh":
            continue  # outlined only: nothing to cache (NoCache)
        site = _declare_state(rewrite, plan)
        if plan.role == "probe":
            _score_probe(rewrite, site)
        else:
            _wrap_in_cond(rewrite, site)
    for entries in rewrite.probe_state.values():  # a probe nothing is gated by keeps its latest value
        for state_name, _, fresh in entries:
            rewrite.new_state[state_name] = fresh
    return rewrite.finish()


def _declare_state(rewrite: _Rewrite, plan: SitePlan) -> _Site:
    """The site's state inputs: its rebuild's cache, each term's own state, its validity."""
    call = _site_call(rewrite.gm, plan)
    region = plan.regions[0]
    outputs = sorted(call.users, key=lambda u: u.args[1])
    cache = []
    for i, item in enumerate(outputs):
        val = tensor_meta(item)
        for j in range(plan.order + 1):
            name = graph_name("cache", plan.name, str(i)) + (f"_d{j}" if j else "")
            cache.append(rewrite.state(StateSpec(name, plan.name, tuple(val.shape), val.dtype,
                                                 role="difference" if j else "value", output=i, difference=j)))
    inputs = list(call.args[: len(region.inputs)])
    term_state = {}
    for kind, declare in _TERM_STATE.items():
        term = plan.term(kind)
        if term is not None:
            term_state[kind] = [rewrite.state(spec) for spec in declare(plan, term, region, inputs)]
    valid = rewrite.state(StateSpec(graph_name("cache", plan.name, "valid"), plan.name, (), torch.bool, role="valid"))
    return _Site(plan, region, call, inputs, list(call.args[len(region.inputs):]), outputs, cache, term_state, valid)


def _offset_state(plan: SitePlan, term: OffsetScore, region: Region, inputs: list[fx.Node]) -> list[StateSpec]:
    # The input of the last full step, and its scale (mean token norm, per item): computed
    # once when the input is stored, not again at every step that scores against it.
    val = tensor_meta(_score_input(region, inputs))
    return [StateSpec(graph_name("cache", plan.name, "in"), plan.name, tuple(val.shape), val.dtype, role="input"),
            StateSpec(graph_name("cache", plan.name, "in_scale"), plan.name, (val.shape[0],), torch.float32, role="input_scale")]


def _change_state(plan: SitePlan, term: AccumulatedChange, region: Region, inputs: list[fx.Node]) -> list[StateSpec]:
    # The previous step's measured node, and the running sum of its rescaled changes.
    val = tensor_meta(term.node)
    return [StateSpec(graph_name("cache", plan.name, "probe"), plan.name, tuple(val.shape), val.dtype, role="measure"),
            StateSpec(graph_name("cache", plan.name, "acc"), plan.name, (), torch.float32, role="accumulated")]


def _rate_state(plan: SitePlan, term: TransformationRate, region: Region, inputs: list[fx.Node]) -> list[StateSpec]:
    # Each stream's previous input and output, the rate of the last full step, the running sum.
    specs = []
    for output, stream in sorted(region.streams.items()):
        x, v = tensor_meta(inputs[stream]), tensor_meta(region.outputs[output])
        specs += [StateSpec(graph_name("cache", plan.name, f"x{output}"), plan.name, tuple(x.shape), x.dtype,
                            role="previous_input", output=output),
                  StateSpec(graph_name("cache", plan.name, f"v{output}"), plan.name, tuple(v.shape), v.dtype,
                            role="previous_output", output=output)]
    return [*specs, StateSpec(graph_name("cache", plan.name, "rate"), plan.name, (), torch.float32, role="rate"),
            StateSpec(graph_name("cache", plan.name, "drift"), plan.name, (), torch.float32, role="accumulated")]


#: The state each kind of term keeps, in the order the state inputs are laid out (after the
#: rebuild's cache, before the validity flag).
_TERM_STATE = {OffsetScore: _offset_state, AccumulatedChange: _change_state, TransformationRate: _rate_state}
#: The order in which terms join a predicate: the offset decision takes the others' verdict.
_TERM_ORDER = (ProbeBelow, FollowsGate, AccumulatedChange, TransformationRate, OffsetScore)


def _ordered(terms: tuple[Any, ...]) -> list[Any]:
    return sorted(terms, key=lambda t: _TERM_ORDER.index(type(t)))


def _score_probe(rewrite: _Rewrite, site: _Site) -> None:
    """A probe always runs: score its fresh residual against the stored one for the sites it gates."""
    graph, name = rewrite.graph, site.plan.name
    with graph.inserting_before(site.outputs[-1].next):
        fresh = _fresh_state(graph, site.plan, site.region, site.inputs, site.outputs)
        score = graph.call_function(ops.offset_score, (fresh[0], site.cache[0]))
        finite = graph.call_function(ops.all_finite, tuple(fresh))
    rewrite.probe_gates[name] = (score, site.valid)
    rewrite.probe_state[name] = [
        *((graph_name("cache", name, str(i)), c, f) for i, (c, f) in enumerate(zip(site.cache, fresh))),
        (graph_name("cache", name, "valid"), site.valid, finite),
    ]
    rewrite.signal(score, name, "score")


@dataclass
class _Predicate:
    """A site's reuse predicate as the terms build it, and what they add to the branches."""

    node: fx.Node
    band_weight: list[fx.Node] = field(default_factory=list)  # operand of the compute branch
    after: list[Any] = field(default_factory=list)  # callables run once the cond exists


def _reuse_predicate(rewrite: _Rewrite, site: _Site, allow: fx.Node) -> _Predicate:
    graph = rewrite.graph
    pred = _Predicate(graph.call_function(operator.and_, (allow, site.valid)))
    for term in _ordered(site.plan.terms):
        _LOWER_TERM[type(term)](rewrite, site, term, pred)
    pred.node._rename(f"{site.plan.name}_reuse_pred")
    return pred


def _lower_probe_below(rewrite: _Rewrite, site: _Site, term: ProbeBelow, pred: _Predicate) -> None:
    graph = rewrite.graph
    score, probe_valid = rewrite.probe_gates[term.probe]
    passes = graph.call_function(ops.below, (score, term.threshold))
    gate = graph.call_function(operator.and_, (passes, probe_valid))
    pred.node = graph.call_function(operator.and_, (pred.node, gate))

    def keep_probe_at_full_steps(results: list[fx.Node], reuse: fx.Node) -> None:
        # A probe keeps the residual of the last *full* step, so its score measures the drift
        # since the cache was filled, not since the previous (cached) step.
        if term.probe in rewrite.probe_state:
            with graph.inserting_before(results[-1].next):
                for name, old, fresh in rewrite.probe_state.pop(term.probe):
                    rewrite.new_state[name] = graph.call_function(ops.blend, (reuse, old, fresh))

    pred.after.append(keep_probe_at_full_steps)


def _lower_follows_gate(rewrite: _Rewrite, site: _Site, term: FollowsGate, pred: _Predicate) -> None:
    pred.node = rewrite.graph.call_function(operator.and_, (pred.node, rewrite.change_verdicts[term.site]))


def _lower_accumulated_change(rewrite: _Rewrite, site: _Site, term: AccumulatedChange, pred: _Predicate) -> None:
    graph, name = rewrite.graph, site.plan.name
    measured, accumulated = site.term_state[AccumulatedChange]
    gate_out = graph.call_function(ops.teacache_gate, (term.node, measured, accumulated, tuple(term.coefficients), term.threshold))
    passes, total, rescaled = (graph.call_function(operator.getitem, (gate_out, i)) for i in range(3))
    rewrite.change_verdicts[name] = passes
    pred.node = graph.call_function(operator.and_, (pred.node, passes))
    verdict = pred.node  # before any offset decision: the gate's own verdict resets its sum
    rewrite.signal(rescaled, name, "score")

    def keep_measure(results: list[fx.Node], reuse: fx.Node) -> None:
        with graph.inserting_before(results[-1].next):
            rewrite.new_state[measured.name] = graph.call_method("clone", (term.node,), {"memory_format": torch.contiguous_format})
            rewrite.new_state[accumulated.name] = graph.call_function(ops.keep_if, (verdict, total))

    pred.after.append(keep_measure)


def _lower_transformation_rate(rewrite: _Rewrite, site: _Site, term: TransformationRate, pred: _Predicate) -> None:
    graph, name = rewrite.graph, site.plan.name
    *streams, rate, accumulated = site.term_state[TransformationRate]
    previous_xs, previous_vs = streams[0::2], streams[1::2]
    outputs = sorted(site.region.streams)
    xs = [site.inputs[site.region.streams[i]] for i in outputs]
    gate_out = graph.call_function(ops.transformation_drift, (xs, previous_xs, previous_vs, rate, accumulated, term.threshold))
    passes, total = (graph.call_function(operator.getitem, (gate_out, i)) for i in range(2))
    pred.node = graph.call_function(operator.and_, (pred.node, passes))
    rewrite.signal(total, name, "score")

    def keep_rate(results: list[fx.Node], reuse: fx.Node) -> None:
        # A full step measures the rate and restarts the sum; every step moves the previous
        # input and output on (the output as the site returned it, rebuilt or computed).
        with graph.inserting_before(results[-1].next):
            vs = [results[i] for i in outputs]
            fresh = graph.call_function(ops.transformation_rate, (vs, previous_vs, xs, previous_xs, site.valid))
            rewrite.new_state[rate.name] = graph.call_function(ops.blend, (reuse, rate, fresh))
            rewrite.new_state[accumulated.name] = graph.call_function(ops.keep_if, (reuse, total))
            for previous, value in (*zip(previous_xs, xs), *zip(previous_vs, vs)):
                rewrite.new_state[previous.name] = graph.call_method("clone", (value,), {"memory_format": torch.contiguous_format})

    pred.after.append(keep_rate)


def _lower_offset_score(rewrite: _Rewrite, site: _Site, term: OffsetScore, pred: _Predicate) -> None:
    graph, rule = rewrite.graph, term.rule
    stored, scale = site.term_state[OffsetScore]
    offset = graph.call_function(ops.adacorrection_score, (_score_input(site.region, site.inputs), stored, rule.lam, scale))
    pred.node = graph.call_function(ops.offset_decision, (pred.node, site.valid, offset, rule.gamma, rule.accept, rule.veto))
    rewrite.signal(offset, site.plan.name, "score")
    if rule.band:
        weight = graph.call_function(ops.correction_weight, (offset, rule.gamma))
        pred.band_weight = [graph.call_function(ops.blend, (site.valid, weight, graph.call_function(ops.one_like, (weight,))))]


_LOWER_TERM = {
    ProbeBelow: _lower_probe_below,
    FollowsGate: _lower_follows_gate,
    AccumulatedChange: _lower_accumulated_change,
    TransformationRate: _lower_transformation_rate,
    OffsetScore: _lower_offset_score,
}


def _wrap_in_cond(rewrite: _Rewrite, site: _Site) -> None:
    """``cond(predicate, reuse branch, compute branch)`` in place of the site's call."""
    graph, plan, call = rewrite.graph, site.plan, site.call
    allow = rewrite.control(ControlSpec(graph_name("allow", plan.name), "allow", plan.name))
    with graph.inserting_before(call):
        pred = _reuse_predicate(rewrite, site, allow)
    state_nodes = [*site.cache, *site.term_state.get(OffsetScore, [])]
    extra = [*([*rewrite.forecast, site.valid] if plan.order else []), *pred.band_weight]
    n_operands = (len(site.inputs), len(state_nodes), len(site.params) + len(extra))
    compute = _branch(rewrite.gm.get_submodule(plan.name), _compute_builder(site, band=bool(pred.band_weight)), *n_operands,
                      f"{plan.name}_compute")
    reuse = _branch(None, _reuse_builder(site), *n_operands, f"{plan.name}_reuse")
    rewrite.gm.add_submodule(f"{plan.name}_compute", compute)
    rewrite.gm.add_submodule(f"{plan.name}_reuse", reuse)

    n_out, n_state = len(site.outputs), len(state_nodes)
    with graph.inserting_before(call):
        # Dense operands: inductor specialises a cond branch to its inputs' strides, and a
        # stream that arrives as a transposed view would not match at run time.
        operands = [graph.call_method("contiguous", (n,)) if tensor_meta(n) is not None else n for n in site.inputs]
        true_fn = graph.get_attr(f"{plan.name}_reuse")
        false_fn = graph.get_attr(f"{plan.name}_compute")
        cond = graph.call_function(
            torch.ops.higher_order.cond, (pred.node, true_fn, false_fn, (*operands, *state_nodes, *site.params, *extra))
        )
        cond._rename(f"{plan.name}_cond")
        cond.meta["nn_module_stack"] = dict(call.meta.get("nn_module_stack") or {})
        cond.meta[META_KEY] = plan.label
        results = _outputs_of(graph, cond, n_out + n_state + 1)
    for item, new in zip(site.outputs, results[:n_out]):
        new.meta = dict(item.meta)
        item.replace_all_uses_with(new)
        graph.erase_node(item)
    graph.erase_node(call)
    for ph, new in zip(state_nodes, results[n_out : n_out + n_state]):
        rewrite.new_state[ph.name] = new
    rewrite.new_state[site.valid.name] = results[n_out + n_state]
    for step in pred.after:  # state the terms update from the verdict (they add no signal)
        step(results, pred.node)
    rewrite.signal(pred.node, plan.name, "reused")


def _compute_builder(site: _Site, band: bool) -> Any:
    """The compute branch: run the site, store its value in the rebuild's form (and each
    term's state), optionally blend the fresh output with the corrected cache."""
    plan, region = site.plan, site.region
    n_out, n_terms, n_params = len(site.outputs), site.terms_per_output, len(site.params)
    keeps_input = plan.term(OffsetScore) is not None

    def build(g: fx.Graph, ins: list[fx.Node], st: list[fx.Node], ps: list[fx.Node]) -> list[fx.Node]:
        call_ = g.call_module("site", (*ins, *ps[:n_params]))
        outs = _outputs_of(g, call_, n_out)
        fresh = _fresh_state(g, plan, region, ins, outs)
        if band:
            # Eq. 7: blend the fresh output with the (offset-corrected) cache by w; with a
            # Taylor order, the cache as the coefficients of this step extrapolate it.
            weight = ps[-1]
            stale = _rebuilt(g, plan, st, ps, n_out, n_terms, n_params)
            stale = _load(g, plan, region, ins, stale, copy=False)
            outs = [g.call_function(ops.correct, (weight, c, o)) for c, o in zip(stale, outs)]
        kept_in = []
        if keeps_input:
            kept = ins[_score_index(region)]
            kept_in = [g.call_method("clone", (kept,), {"memory_format": torch.contiguous_format}),
                       g.call_function(ops.offset_scale, (kept,))]
        if plan.order:
            # After the forecast coefficients: the update factors, then the cache's validity
            # (the band weight, if any, is last).
            update = ps[n_params + 1]
            terms = []
            for i in range(n_out):
                new = g.call_function(ops.taylor_update, (ps[n_params + 2], ps[n_params], update, fresh[i], *st[i * n_terms : (i + 1) * n_terms]))
                terms += [g.call_function(operator.getitem, (new, j)) for j in range(n_terms)]
            fresh = terms
        # Every stored term is checked: a NaN in a higher difference would poison every forecast.
        return [*_dense(g, outs, like=None if band else site.outputs), *_dense(g, fresh), *kept_in,
                g.call_function(ops.all_finite, tuple(fresh))]

    return build


def _rebuilt(g: fx.Graph, plan: SitePlan, st: list[fx.Node], ps: list[fx.Node], n_out: int, n_terms: int, n_params: int) -> list[fx.Node]:
    """The stored value of each output as a reuse rebuilds it: the forecast of this step's
    coefficients, or the stored value itself."""
    if plan.order:
        coef = ps[n_params]
        return [g.call_function(ops.taylor_forecast, (coef, *st[i * n_terms : (i + 1) * n_terms])) for i in range(n_out)]
    return [st[i * n_terms] for i in range(n_out)]


def _reuse_builder(site: _Site) -> Any:
    """The reuse branch: rebuild the outputs from the cache without running the site."""
    plan, region = site.plan, site.region
    n_out, n_terms, n_params = len(site.outputs), site.terms_per_output, len(site.params)

    def build(g: fx.Graph, ins: list[fx.Node], st: list[fx.Node], ps: list[fx.Node]) -> list[fx.Node]:
        cached = _rebuilt(g, plan, st, ps, n_out, n_terms, n_params) if plan.order else st[:n_out]
        outs = _load(g, plan, region, ins, cached, copy=True)
        # cond branches may not return their inputs: hand back a copy of the cache. The copy
        # is tagged so that the eager lowering, which has no such rule, can drop it.
        kept = [g.call_method("clone", (s,), {"memory_format": torch.contiguous_format}) for s in st]
        for node in kept:
            node.meta[STATE_COPY] = True
        return [*_dense(g, outs), *kept, g.call_method("new_ones", (st[0], ()), {"dtype": torch.bool})]

    return build
