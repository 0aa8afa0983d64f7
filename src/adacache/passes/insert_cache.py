"""Pass 2 (outline sites) and pass 3 (insert cache nodes).

After this pass the graph is *functional in its cache state*:

    (user inputs, controls, cache_in) -> (user outputs, cache_out, signals)

For every cached site the outlined call becomes

    pred   = allow & valid_in [& below(offset_score(probe), threshold)]
    result = cond(pred, reuse_branch, compute_branch, (site inputs, cache_in))

where ``reuse_branch`` rebuilds the outputs from the cache (``cache_load``) without
running the site, and ``compute_branch`` runs it and refreshes the cache. The cond is
``torch.ops.higher_order.cond``, so the same graph exports to ONNX ``If`` and compiles
without re-tracing; the eager backend lowers it to a plain Python branch (see
:mod:`adacache.passes.lower`).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx, nn

from .. import ops
from ..errors import NotEligibleError
from .contract import AccumulatedChange, CacheLayout, SitePlan, StateSpec
from .hoist import hoist_probe
from .outline import outline_region, region_parameters
from .regions import Region, build_region, compute_order, tensor_meta
from .span import span_hull, take_trailing_slices


META_KEY = "adacache"
# Marks a copy of cache state made only because a cond branch may not return its inputs.
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


def _dense(graph: fx.Graph, nodes: list[fx.Node]) -> list[fx.Node]:
    """Both branches of a cond must return the same memory layout: make it contiguous."""
    return [graph.call_method("contiguous", (n,)) for n in nodes]


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


def insert_cache_nodes(gm: fx.GraphModule, sites: list[SitePlan]) -> fx.GraphModule:
    """Wrap every outlined site in cache nodes and thread the cache state through the graph.

    Expects :func:`outline_sites` to have run. Records a :class:`CacheLayout` in
    ``gm.meta["adacache"]``.
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output_node = graph.output_node()
    user_outputs = list(output_node.args[0])
    layout = CacheLayout(num_user_inputs=len(placeholders), num_user_outputs=len(user_outputs), sites=list(sites))
    new_state: dict[str, fx.Node] = {}
    signal_out: list[fx.Node] = []
    last_ph = placeholders[-1] if placeholders else None
    gates: dict[str, tuple[fx.Node, fx.Node]] = {}
    probe_state: dict[str, list[tuple[str, fx.Node, fx.Node]]] = {}
    tea_gates: dict[str, fx.Node] = {}  # site -> its TeaCache gate, for the sites that follow it

    def new_placeholder(name: str) -> fx.Node:
        nonlocal last_ph
        if last_ph is None:
            with graph.inserting_before(next(iter(graph.nodes))):
                ph = graph.placeholder(name)
        else:
            with graph.inserting_after(last_ph):
                ph = graph.placeholder(name)
        last_ph = ph
        return ph

    controls: list[fx.Node] = []
    states_in: list[tuple[StateSpec, fx.Node]] = []
    forecast: list[fx.Node] = []
    layout.forecast_order = max((s.order for s in sites), default=0)
    if layout.forecast_order:
        forecast = [new_placeholder("forecast__coef"), new_placeholder("forecast__update")]
        controls.extend(forecast)
        layout.controls.extend(n.name for n in forecast)

    for site in sites:
        if site.role == "fresh":
            continue  # outlined only: nothing to cache (NoCache)
        call = _site_call(gm, site)
        region = site.regions[0]
        n_out = len(region.outputs)
        inputs = list(call.args[: len(region.inputs)])
        params = list(call.args[len(region.inputs) :])
        getitems = sorted(call.users, key=lambda u: u.args[1])
        cache_nodes: list[fx.Node] = []  # output-major: D_0..D_order of output 0, then output 1, ...
        n_terms = site.order + 1
        for i, item in enumerate(getitems):
            val = tensor_meta(item)
            for j in range(n_terms):
                name = f"cache__{site.name}__{i}" + (f"_d{j}" if j else "")
                spec = StateSpec(name, site.name, tuple(val.shape), val.dtype, "cache")
                ph = new_placeholder(spec.name)
                states_in.append((spec, ph))
                cache_nodes.append(ph)
        score_src = _score_input(region, inputs)
        offset_in: list[fx.Node] = []
        if site.offset is not None:
            # AdaCorrection compares the site's input with the input of the last full step.
            # Its scale (mean token norm, per item) is kept beside it: computed once when the
            # input is stored, not again at every step that scores against it.
            val = tensor_meta(score_src)
            for spec in (
                StateSpec(f"cache__{site.name}__in", site.name, tuple(val.shape), val.dtype, "cache"),
                StateSpec(f"cache__{site.name}__in_scale", site.name, (val.shape[0],), torch.float32, "cache"),
            ):
                offset_in.append(new_placeholder(spec.name))
                states_in.append((spec, offset_in[-1]))
        tea: list[fx.Node] = []
        if site.probe is not None:
            # TeaCache keeps the previous step's probe and the running sum of its changes.
            val = tensor_meta(site.probe)
            for spec in (
                StateSpec(f"cache__{site.name}__probe", site.name, tuple(val.shape), val.dtype, "cache"),
                StateSpec(f"cache__{site.name}__acc", site.name, (), torch.float32, "cache"),
            ):
                tea.append(new_placeholder(spec.name))
                states_in.append((spec, tea[-1]))
        valid_spec = StateSpec(f"cache__{site.name}__valid", site.name, (), torch.bool, "valid")
        valid_in = new_placeholder(valid_spec.name)
        states_in.append((valid_spec, valid_in))

        if site.role == "probe":
            with graph.inserting_before(getitems[-1].next):
                fresh = _fresh_state(graph, site, region, inputs, getitems)
                score = graph.call_function(ops.offset_score, (fresh[0], cache_nodes[0]))
                finite = graph.call_function(ops.all_finite, tuple(fresh))
            gates[site.name] = (score, valid_in)
            probe_state[site.name] = [
                *((f"cache__{site.name}__{i}", c, f) for i, (c, f) in enumerate(zip(cache_nodes, fresh))),
                (valid_spec.name, valid_in, finite),
            ]
            signal_out.append(score)
            layout.signals.append(f"signal__{site.name}__score")
            continue

        allow = new_placeholder(f"allow__{site.name}")
        controls.append(allow)
        layout.controls.append(allow.name)
        site_module = gm.get_submodule(site.name)

        n_params = len(params)
        band = site.offset is not None and site.offset.band

        def build_compute(g: fx.Graph, ins: list[fx.Node], st: list[fx.Node], ps: list[fx.Node], site=site, region=region, n_out=n_out, n_terms=n_terms, n_params=n_params, band=band):
            call_ = g.call_module("site", (*ins, *ps[:n_params]))
            outs = _outputs_of(g, call_, n_out)
            fresh = _fresh_state(g, site, region, ins, outs)
            if band:
                # Eq. 7: blend the fresh output with the (offset-corrected) cache by w; with a
                # Taylor order, the cache as the coefficients of this step extrapolate it.
                weight = ps[-1]
                if site.order:
                    stale = [g.call_function(ops.taylor_forecast, (ps[n_params], *st[i * n_terms : (i + 1) * n_terms])) for i in range(n_out)]
                else:
                    stale = [st[i * n_terms] for i in range(n_out)]
                stale = _load(g, site, region, ins, stale, copy=False)
                outs = [g.call_function(ops.correct, (weight, c, o)) for c, o in zip(stale, outs)]
            kept_in = []
            if site.offset is not None:
                kept = ins[_score_index(region)]
                kept_in = [g.call_method("clone", (kept,), {"memory_format": torch.contiguous_format}),
                           g.call_function(ops.offset_scale, (kept,))]
            if site.order:
                # After the forecast coefficients: the update factors, then the cache's validity
                # (the band weight, if any, is last).
                update = ps[n_params + 1]
                terms = []
                for i in range(n_out):
                    new = g.call_function(ops.taylor_update, (ps[n_params + 2], ps[n_params], update, fresh[i], *st[i * n_terms : (i + 1) * n_terms]))
                    terms += [g.call_function(operator.getitem, (new, j)) for j in range(n_terms)]
                fresh = terms
            # Every stored term is checked: a NaN in a higher difference would poison every forecast.
            return [*_dense(g, outs), *_dense(g, fresh), *kept_in, g.call_function(ops.all_finite, tuple(fresh))]

        def build_reuse(g: fx.Graph, ins: list[fx.Node], st: list[fx.Node], ps: list[fx.Node], site=site, region=region, n_out=n_out, n_terms=n_terms, n_params=n_params):
            if site.order:
                coef = ps[n_params]
                cached = [g.call_function(ops.taylor_forecast, (coef, *st[i * n_terms : (i + 1) * n_terms])) for i in range(n_out)]
            else:
                cached = st[:n_out]
            outs = _load(g, site, region, ins, cached, copy=True)
            # cond branches may not return their inputs: hand back a copy of the cache. The copy
            # is tagged so that the eager lowering, which has no such rule, can drop it.
            kept = [g.call_method("clone", (s,), {"memory_format": torch.contiguous_format}) for s in st]
            for node in kept:
                node.meta[STATE_COPY] = True
            return [*_dense(g, outs), *kept, g.call_method("new_ones", (st[0], ()), {"dtype": torch.bool})]

        state_nodes = [*cache_nodes, *offset_in]
        with graph.inserting_before(call):
            pred = graph.call_function(operator.and_, (allow, valid_in))
            if site.gated_by is not None:
                score, probe_valid = gates[site.gated_by]
                passes = graph.call_function(ops.below, (score, site.threshold))
                gate = graph.call_function(operator.and_, (passes, probe_valid))
                pred = graph.call_function(operator.and_, (pred, gate))
            if site.follows is not None:
                pred = graph.call_function(operator.and_, (pred, tea_gates[site.follows]))
            if site.probe is not None:
                gate_out = graph.call_function(ops.teacache_gate, (site.probe, tea[0], tea[1], tuple(site.coefficients), site.threshold))
                passes, total, rescaled = (graph.call_function(operator.getitem, (gate_out, i)) for i in range(3))
                tea_gates[site.name] = passes
                pred = graph.call_function(operator.and_, (pred, passes))
                tea_verdict = pred  # before any offset rule: TeaCache's own decision resets its sum
                signal_out.append(rescaled)
                layout.signals.append(f"signal__{site.name}__score")
            weight_operand: list[fx.Node] = []
            if site.offset is not None:
                rule = site.offset
                offset = graph.call_function(ops.adacorrection_score, (score_src, offset_in[0], rule.lam, offset_in[1]))
                pred = graph.call_function(ops.offset_decision, (pred, valid_in, offset, rule.gamma, rule.accept, rule.veto))
                signal_out.append(offset)
                layout.signals.append(f"signal__{site.name}__score")
                if rule.band:
                    weight = graph.call_function(ops.correction_weight, (offset, rule.gamma))
                    weight_operand = [graph.call_function(ops.blend, (valid_in, weight, graph.call_function(ops.one_like, (weight,))))]
            pred._rename(f"{site.name}_reuse_pred")
        extra = [*([*forecast, valid_in] if site.order else []), *weight_operand]
        compute_gm = _branch(site_module, build_compute, len(inputs), len(state_nodes), len(params) + len(extra), f"{site.name}_compute")
        reuse_gm = _branch(None, build_reuse, len(inputs), len(state_nodes), len(params) + len(extra), f"{site.name}_reuse")
        gm.add_submodule(f"{site.name}_compute", compute_gm)
        gm.add_submodule(f"{site.name}_reuse", reuse_gm)

        with graph.inserting_before(call):
            # Dense operands: inductor specialises a cond branch to its inputs' strides, and a
            # stream that arrives as a transposed view would not match at run time.
            operands = [graph.call_method("contiguous", (n,)) if tensor_meta(n) is not None else n for n in inputs]
            true_fn = graph.get_attr(f"{site.name}_reuse")
            false_fn = graph.get_attr(f"{site.name}_compute")
            cond = graph.call_function(
                torch.ops.higher_order.cond, (pred, true_fn, false_fn, (*operands, *state_nodes, *params, *extra))
            )
            cond._rename(f"{site.name}_cond")
            cond.meta["nn_module_stack"] = dict(call.meta.get("nn_module_stack") or {})
            cond.meta[META_KEY] = site.label
            n_state = len(state_nodes)
            results = _outputs_of(graph, cond, n_out + n_state + 1)
        for item, new in zip(getitems, results[:n_out]):
            new.meta = dict(item.meta)
            item.replace_all_uses_with(new)
            graph.erase_node(item)
        graph.erase_node(call)
        for ph, new in zip(state_nodes, results[n_out : n_out + n_state]):
            new_state[ph.name] = new
        new_state[valid_spec.name] = results[n_out + n_state]
        if site.probe is not None:
            with graph.inserting_before(results[-1].next):
                new_state[tea[0].name] = graph.call_method("clone", (site.probe,), {"memory_format": torch.contiguous_format})
                new_state[tea[1].name] = graph.call_function(ops.keep_if, (tea_verdict, total))
        signal_out.append(pred)
        layout.signals.append(f"signal__{site.name}__reused")

        if site.gated_by is not None and site.gated_by in probe_state:
            # A probe keeps the residual of the last *full* step, so its score measures the
            # drift since the cache was filled, not since the previous (cached) step.
            with graph.inserting_before(results[-1].next):
                for name, old, fresh in probe_state.pop(site.gated_by):
                    new_state[name] = graph.call_function(ops.blend, (pred, old, fresh))

    for name, entries in probe_state.items():  # a probe nothing is gated by keeps its latest value
        for state_name, _, fresh in entries:
            new_state[state_name] = fresh

    layout.states = [spec for spec, _ in states_in]
    # Controls sit before the state tensors among the inputs.
    for ctrl in controls:
        first_state = states_in[0][1]
        first_state.prepend(ctrl)
    if not states_in:  # nothing cached: the graph's signature is the model's own
        gm.meta[META_KEY] = layout
        graph.lint()
        gm.recompile()
        return gm
    output_node.args = (tuple(user_outputs) + tuple(new_state[s.name] for s in layout.states) + tuple(signal_out),)
    gm.meta[META_KEY] = layout
    graph.lint()
    gm.recompile()
    return gm
