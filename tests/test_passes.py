"""Graph-diff tests: what each pass inserts, where, and that nothing else changes."""

from __future__ import annotations

import collections
import operator

import pytest
import torch
from torch import fx

import adacache
from adacache.capture import capture
from adacache.passes import find_blocks, insert_cache_nodes, lower_cond_to_python, outline_sites, require_finite_inputs
from adacache.passes.lower import _python_binding, branch, drop_state_copies
from adacache.policies.base import span_label
from adacache.compiler import copy_graph_module
from families import FAMILIES


def aten_ops(gm: fx.GraphModule) -> collections.Counter:
    """Every aten op the graph can execute on its compute path, counted through site
    modules and the compute branch of every cond (the reuse branch holds no model ops)."""
    counts: collections.Counter = collections.Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            counts[str(node.target)] += 1
        elif node.op == "call_module":
            counts.update(aten_ops(gm.get_submodule(node.target)))
        elif node.op == "call_function" and node.target in (torch.ops.higher_order.cond, branch):
            compute = gm.get_submodule(node.args[2].target)
            counts.update(aten_ops(compute))
            reuse = gm.get_submodule(node.args[1].target)
            assert not aten_ops(reuse), "a reuse branch must not run model ops"
    return counts


def _captured(name: str):
    model, inputs, blocks = FAMILIES[name]()
    return model, capture(model, (), inputs(torch.tensor(900.0))), blocks


def test_find_blocks_tags_exactly_the_block_nodes():
    model, cap, _ = _captured("tiny_dit")
    before = [n.name for n in cap.graph_module.graph.nodes]
    blocks = find_blocks(cap.graph_module, model)
    assert [b.name for b in blocks] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert [n.name for n in cap.graph_module.graph.nodes] == before, "annotation must not change the graph"
    tagged = [n for n in cap.graph_module.graph.nodes if "adacache_region" in n.meta]
    assert len(tagged) == sum(len(b.nodes) for b in blocks) == 4 * 41
    for block in blocks:
        stream = block.inputs[block.streams[0]]
        assert tuple(stream.meta["val"].shape) == (2, 16, 64), "the stream is the token sequence"
        assert block.is_residual
        assert [s.name.rsplit(".", 1)[1] for s in block.submodules] == ["attn", "mlp"]


# The pinned shape of the rewritten graph. A change here is a change of the IR that
# every backend consumes: update it on purpose, never to make a test pass.
FORA_TINY_DIT = [
    "input x", "input timestep", "input class_labels", "input allow__* x1", "input cache__* x2", "all_finite(x, timestep)", "ops x19",
    "and(allow__site_0, cache__site_0__valid)", "ops x2", "and(site_0_reuse_pred, user_inputs_finite)",
    "cond site_0_reuse_if_finite ? site_0_reuse : site_0_compute",
    "ops x15", "output x4",
]
FBCACHE_TINY_DIT = [
    "input x", "input timestep", "input class_labels", "input allow__* x1", "input cache__* x4", "all_finite(x, timestep)", "ops x19",
    "call site_0", "ops x1", "residual_of(_, _)", "offset_score(residual_of, cache__site_0__0)", "all_finite(residual_of)",
    "and(allow__site_1, cache__site_1__valid)", "below(offset_score)", "and(below, cache__site_0__valid)",
    "and(and_, and__1)", "ops x2", "and(site_1_reuse_pred, user_inputs_finite)",
    "cond site_1_reuse_if_finite ? site_1_reuse : site_1_compute",
    "blend(site_1_reuse_if_finite, cache__site_0__0, residual_of)", "blend(site_1_reuse_if_finite, cache__site_0__valid, all_finite)",
    "block blocks.3 [41 nodes]", "ops x15", "output x7",
]
# AdaCorrection decides per block: per site one score against the stored input and its
# scale, one fused predicate, one cond. Every node here runs at every step, so an extra one
# is a cost on every block (the reason this is pinned).
ADACORRECTION_TINY_DIT = [
    "input x", "input timestep", "input class_labels", "input allow__* x4", "input cache__* x16", "all_finite(x, timestep)", "ops x19",
    *[item for i in range(4) for item in (
        f"and(allow__site_{i}, cache__site_{i}__valid)",
        f"adacorrection_score(_, cache__site_{i}__in, cache__site_{i}__in_scale)",
        f"offset_decision({'and_' if i == 0 else f'and__{i}'}, cache__site_{i}__valid, adacorrection_score{'' if i == 0 else f'_{i}'})",
        "ops x2", f"and(site_{i}_reuse_pred, user_inputs_finite)", f"cond site_{i}_reuse_if_finite ? site_{i}_reuse : site_{i}_compute")],
    "ops x15", "output x25",
]
ORIGINAL_TINY_DIT = [
    "input x", "input timestep", "input class_labels", "ops x19", "block blocks.0 [41 nodes]", "block blocks.1 [41 nodes]",
    "block blocks.2 [41 nodes]", "block blocks.3 [41 nodes]", "ops x15", "output x1",
]


@pytest.mark.parametrize(
    "policy, expected",
    [(adacache.FORA(interval=2), FORA_TINY_DIT), (adacache.FirstBlockCache(0.1, tail_blocks=1), FBCACHE_TINY_DIT),
     (adacache.AdaCorrection(base=adacache.FORA(interval=2), veto=0.5), ADACORRECTION_TINY_DIT)],
    ids=["fora", "first_block_cache", "adacorrection"],
)
def test_rewritten_graph_structure_is_pinned(policy, expected):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, policy, example_inputs=((), inputs(torch.tensor(900.0))))
    program = cached.adacache.programs[0]
    assert adacache.graph_structure(program.original) == ORIGINAL_TINY_DIT
    assert adacache.graph_structure(program.portable) == expected
    diff = adacache.graph_diff(program.original, program.portable)
    assert "-block blocks.0 [41 nodes]" in diff and "+input cache__* x" in diff
    text = adacache.explain(cached)
    assert "eligible blocks: 4" in text and "graph diff" in text


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("granularity", ["block", "module"])
def test_cache_nodes_surround_every_eligible_unit_and_nothing_else(name, granularity):
    model, cap, n_blocks = _captured(name)
    original_ops = aten_ops(cap.graph_module)
    gm = cap.graph_module
    blocks = find_blocks(gm, model, with_submodules=granularity == "module")
    assert len(blocks) == n_blocks
    policy = adacache.FORA(interval=2, granularity=granularity)
    sites = policy.plan(blocks)
    # Whole blocks share FORA's schedule, so they form one span (the same computation as
    # reusing each block); attention / feed-forward calls are one unit each.
    units = [blocks] if granularity == "block" else [[s] for b in blocks for s in b.submodules]
    assert [s.label for s in sites] == [span_label(u) for u in units]
    outline_sites(gm, sites)
    insert_cache_nodes(gm, sites)
    gm.graph.lint()
    conds = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == len(units), "one cond per cached unit or span"
    for cond, site in zip(conds, sites):
        assert cond.meta["adacache"] == site.label
        assert "nn_module_stack" in cond.meta, "inserted nodes carry the module stack"
    # Every original computation is still there, exactly once, on the compute path.
    assert aten_ops(gm) == original_ops
    layout = gm.meta["adacache"]
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders[layout.num_user_inputs :] == [c.name for c in layout.controls] + [s.name for s in layout.states]
    n_out = len(gm.graph.output_node().args[0])
    assert n_out == layout.num_user_outputs + len(layout.states) + len(layout.signals)


def test_eager_lowering_swaps_only_the_conds():
    model, cap, _ = _captured("tiny_dit")
    gm = cap.graph_module
    sites = adacache.TaylorSeer(order=0, interval=2)._per_unit_sites(find_blocks(gm, model), "output")
    insert_cache_nodes(outline_sites(gm, sites), sites)
    before = [(n.op, n.target) for n in gm.graph.nodes]
    lower_cond_to_python(gm)
    after = [(n.op, n.target) for n in gm.graph.nodes]
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(changed) == 4  # one cond per block
    assert all(a[1] is torch.ops.higher_order.cond and b[1] is branch for a, b in changed)


def test_finite_inputs_pass_guards_every_cond_with_one_check_of_the_floating_user_inputs():
    model, cap, _ = _captured("tiny_dit")
    gm = cap.graph_module
    sites = adacache.FORA(interval=2)._per_unit_sites(find_blocks(gm, model), "output")  # one site per block
    insert_cache_nodes(outline_sites(gm, sites), sites)
    before = adacache.graph_structure(gm)
    require_finite_inputs(gm)
    checks = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is adacache.ops.all_finite and n.name == "user_inputs_finite"]
    assert len(checks) == 1
    assert [a.name for a in checks[0].args] == ["x", "timestep"], "floating user inputs only (not class_labels, controls, states)"
    conds = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == 4
    for cond in conds:
        pred = cond.args[0]
        assert pred.target is operator.and_ and pred.args[1] is checks[0]
        assert pred in gm.graph.output_node().args[0], "the reused signal reports the guarded decision"
    after = adacache.graph_structure(gm)
    assert len(after) == len(before) + 5 and sorted(s for s in after if s not in before) == sorted([
        "all_finite(x, timestep)", *[f"and(site_{i}_reuse_pred, user_inputs_finite)" for i in range(4)],
        *[f"cond site_{i}_reuse_if_finite ? site_{i}_reuse : site_{i}_compute" for i in range(4)],
    ])


def test_eager_lowering_drops_only_the_state_copies_cond_forces():
    model, cap, _ = _captured("tiny_dit")
    gm = cap.graph_module
    sites = adacache.FORA(interval=2)._per_unit_sites(find_blocks(gm, model), "output")  # one site per block
    insert_cache_nodes(outline_sites(gm, sites), sites)

    def clones(module):
        return sum(1 for n in module.graph.nodes if n.op == "call_method" and n.target == "clone")

    portable = {name: clones(m) for name, m in gm.named_children() if name.endswith("_reuse")}
    lowered = drop_state_copies(lower_cond_to_python(copy_graph_module(gm)))
    after = {name: clones(m) for name, m in lowered.named_children() if name.endswith("_reuse")}
    # FORA (output reuse) keeps one state tensor per site: its copy goes, the output copy stays.
    assert portable == {f"site_{i}_reuse": 2 for i in range(4)}
    assert after == {f"site_{i}_reuse": 1 for i in range(4)}
    assert {name: clones(m) for name, m in gm.named_children() if name.endswith("_reuse")} == portable, "portable graph untouched"


def test_operator_bindings_are_the_generated_ones():
    assert _python_binding(torch.ops.aten.add.Tensor) is torch._C._VariableFunctions.add
    assert _python_binding(torch.ops.aten.linear.default) is torch._C._nn.linear
    assert _python_binding(torch.ops.aten.split.Tensor) is torch._C._VariableFunctions.split  # not torch.split's wrapper
    assert _python_binding(torch.ops.aten.slice.Tensor) is None  # a method only: left as the overload
    assert _python_binding(torch.ops.prims.add.default) is None  # other namespaces: their own schemas


def test_eager_lowering_binds_aten_operators_and_leaves_the_portable_graph_alone():
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, adacache.FORA(interval=2), example_inputs=((), inputs(torch.tensor(900.0))))
    program = cached.adacache.programs[0]

    def targets(gm):
        own = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        return own + [t for m in gm.children() if isinstance(m, fx.GraphModule) for t in targets(m)]

    portable, eager = targets(program.portable), targets(program.graph_module)
    bound = [t for t in portable if isinstance(t, torch._ops.OpOverload) and _python_binding(t) is not None]
    assert {str(t) for t in bound} >= {"aten.linear.default", "aten.layer_norm.default", "aten.scaled_dot_product_attention.default"}
    left = [t for t in eager if isinstance(t, torch._ops.OpOverload)]
    assert all(_python_binding(t) is None for t in left), "every operator with a binding is called through it"
    assert {_python_binding(t) for t in bound} <= set(eager)
    assert all(isinstance(t, torch._ops.OpOverload) for t in bound), "the portable graph keeps its overloads"


def test_user_block_pattern_overrides_search():
    model, cap, _ = _captured("tiny_dit")
    blocks = find_blocks(cap.graph_module, model, pattern="blocks.[12]")
    assert [b.name for b in blocks] == ["blocks.1", "blocks.2"]


def test_eager_reuse_branch_runs_only_the_forecast():
    """What a reused block costs in eager: the forecast, the residual add, and nothing that
    copies the cache (cond's copies are dropped by the eager lowering)."""
    model, inputs, _ = FAMILIES["tiny_dit"]()
    policy = adacache.AdaCorrection(base=adacache.TaylorSeer(order=1, interval=2), veto=0.5)
    cached = adacache.compile(model, policy, example_inputs=((), inputs(torch.tensor(900.0))))
    program = cached.adacache.programs[0]

    def calls(branch):
        return [getattr(n.target, "__name__", n.target) for n in branch.graph.nodes if n.op in ("call_function", "call_method")]

    assert calls(program.graph_module.site_1_reuse) == ["taylor_forecast", "cache_load", "contiguous", "new_ones"]
    portable = calls(program.portable.site_1_reuse)
    assert portable.count("clone") == 4, "the portable graph keeps cond's copies of D0, D1, the input and its scale"


class _ResidualLinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x


class _MaskedBlocks(torch.nn.Module):
    """HunyuanVideo combines two attention masks with ``&``: a dunder operator whose Python
    binding has no module FX could name in generated code."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_ResidualLinear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        keep = (x > -10) & (x < 10) | (x == 0)
        for block in self.blocks:
            x = block(x)
        return torch.where(keep, x, torch.zeros_like(x)) + timestep.view(-1, 1)


@pytest.mark.parametrize("policy", [adacache.NoCache(), adacache.FORA(interval=2)])
def test_dunder_operators_keep_their_aten_overload(policy):
    model = _MaskedBlocks().eval()
    for op in (torch.ops.aten.bitwise_and.Tensor, torch.ops.aten.__and__.Tensor, torch.ops.aten.__or__.Tensor):
        binding = _python_binding(op)
        assert binding is None or fx.node._get_qualified_name(binding)
    compiled = adacache.compile(model, policy)
    x = torch.randn(2, 8)
    with torch.no_grad():
        for t in (900.0, 800.0):
            assert torch.allclose(compiled(x, torch.full((2,), t)), model(x, torch.full((2,), t)))


# -- the contract the passes own (issue 29, stage 1) ----------------------------------------

def test_the_passes_import_no_policy():
    """Policies describe sites in passes/contract.py's words; no pass knows a method by name."""
    import ast
    from pathlib import Path

    import adacache.passes

    offenders = []
    for path in Path(adacache.passes.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and "policies" in (node.module or ""):
                offenders.append(f"{path.name}: from {'.' * node.level}{node.module}")
            elif isinstance(node, ast.Import) and any("policies" in alias.name for alias in node.names):
                offenders.append(f"{path.name}: import {[a.name for a in node.names]}")
    assert offenders == []


def test_a_site_is_described_by_its_rebuild_and_terms():
    from adacache.passes.contract import (
        AccumulatedChange,
        FollowsGate,
        OffsetRule,
        OffsetScore,
        ProbeBelow,
        SitePlan,
        rebuild_for,
    )

    rule = OffsetRule(gamma=1.0, lam=0.0, accept=0.0, veto=0.2, band=False)
    site = SitePlan("site_1", "blocks.1..3", (), rebuild=rebuild_for("output", 2),
                    terms=(ProbeBelow("site_0", 0.08), OffsetScore(rule)))
    assert (site.reuse, site.order, site.gated_by, site.threshold, site.offset) == ("output", 2, "site_0", 0.08, rule)
    assert site.probe is None and site.follows is None and site.coefficients == ()
    site.renamed_sites({"site_0": "site_4"})
    assert site.gated_by == "site_4"
    gate = AccumulatedChange(node="n", coefficients=(2.0, 0.0), threshold=0.1)
    tea = SitePlan("site_0", "blocks.0..3", (), terms=(gate,))
    assert (tea.reuse, tea.order, tea.probe, tea.coefficients, tea.threshold) == ("residual", 0, "n", (2.0, 0.0), 0.1)
    tea.with_term(gate, FollowsGate("site_9", 0.1))
    assert tea.follows == "site_9" and tea.probe is None and tea.threshold == 0.1


def test_squeezes_that_remove_nothing_are_dropped():
    """ONNX's Squeeze refuses an axis that is not 1 (PixArt squeezes a 64-wide dimension);
    the pass keeps only real squeezes, and the graph computes the same."""
    from adacache.capture import capture
    from adacache.passes import drop_noop_squeezes

    class Squeezes(torch.nn.Module):
        def forward(self, x):
            return x.squeeze(1) + x.squeeze(2).unsqueeze(2) * 0 + torch.squeeze(x, (0, 1, 2)).unsqueeze(0).unsqueeze(2)

    x = torch.randn(1, 64, 1, 8)
    gm = capture(Squeezes(), (x,), {}).graph_module
    before = [(n.target, n.args[1]) for n in gm.graph.nodes if "squeeze" in str(n.target) and "unsqueeze" not in str(n.target)]
    drop_noop_squeezes(gm)
    after = [(n.target, n.args[1]) for n in gm.graph.nodes if "squeeze" in str(n.target) and "unsqueeze" not in str(n.target)]
    assert len(before) == 3
    assert after == [(torch.ops.aten.squeeze.dim, 2), (torch.ops.aten.squeeze.dims, [0, 2])]
    assert torch.equal(gm(x)[0] if isinstance(gm(x), (tuple, list)) else gm(x), Squeezes()(x))


class _ScatteredBlocks(torch.nn.Module):
    """Writes its result into columns chosen by an index tensor (``out[:, idx] = y``): an
    ``index_put_`` whose index list holds ``None``, which the Python binding refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_ResidualLinear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        out = torch.zeros(2, 10)
        out[:, torch.arange(8) + 1] = x + timestep.view(-1, 1)
        return out


def test_operators_taking_optional_tensor_lists_keep_their_overload():
    assert _python_binding(torch.ops.aten.index_put_.default) is None
    assert _python_binding(torch.ops.aten.index_put.default) is None
    model = _ScatteredBlocks().eval()
    compiled = adacache.compile(model, adacache.NoCache())
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(compiled(x, torch.full((2,), 900.0)), model(x, torch.full((2,), 900.0)))


def test_a_site_reads_attributes_export_placed_inside_its_block():
    """torch.export places the ``get_attr`` of a block's attention score or mask function
    where it is used, inside the block; the site's call, placed where the block began, must
    come after it."""
    from adacache.passes.outline import outline_region

    model, inputs, _ = FAMILIES["tiny_dit"]()
    captured = capture(model, (), inputs(torch.tensor(500.0)))
    gm = captured.graph_module
    block = find_blocks(gm, model)[1]
    params = [arg for node in block.nodes for arg in node.all_input_nodes if arg.op == "get_attr"]
    block.nodes[len(block.nodes) // 2].prepend(params[0])  # as export leaves it for a score function
    outline_region(gm, block, "site_x")
    gm.graph.lint()
    gm.recompile()
    feeds = inputs(torch.tensor(500.0))
    with torch.no_grad():
        assert torch.equal(gm(*captured.flatten_inputs((), feeds))[0], model(**feeds))


def test_inductor_lowering_pins_only_the_cond_operands_and_leaves_the_portable_graph_alone():
    from adacache.compiler import compile_graph
    from adacache.passes.lower import pin_cond_operands

    model, inputs, _ = FAMILIES["tiny_dit"]()
    graph = compile_graph(model, adacache.FORA(interval=2), (), inputs(torch.tensor(500.0)))
    before = [n.format_node() for n in graph.portable.graph.nodes]
    pinned = pin_cond_operands(copy_graph_module(graph.portable))
    assert [n.format_node() for n in graph.portable.graph.nodes] == before, "the portable graph keeps its contiguous()"
    (cond,) = [n for n in pinned.graph.nodes if n.target is torch.ops.higher_order.cond]
    site_inputs = cond.args[3][: sum(1 for n in cond.args[3] if n.op != "placeholder" and n.op != "get_attr")]
    assert site_inputs and all(n.target is torch.ops.adacache.dense_copy.default for n in site_inputs)
    assert not any(n.op == "call_method" and n.target == "contiguous" and cond in n.users for n in pinned.graph.nodes)
    flat = graph.captured.flatten_inputs((), inputs(torch.tensor(500.0)))
    controls = [torch.tensor(False)] * len(graph.layout.controls)
    states = [torch.zeros(s.shape, dtype=s.dtype) for s in graph.layout.states]
    with torch.no_grad():
        for want, got in zip(graph.portable(*flat, *controls, *states), pinned(*flat, *controls, *states)):
            assert torch.equal(want, got)


class _BooleanSelects(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (a.masked_fill(~c, False), a.masked_fill(c, True), torch.where(c, a, b), torch.where(c, a.float(), b.float()))


def test_boolean_selects_are_spelled_with_logic_and_compute_the_same():
    from adacache.passes import spell_boolean_selects

    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(4, 5, generator=gen) > 0.5 for _ in range(3))
    gm = capture(_BooleanSelects(), (a, b, c)).graph_module
    expected = gm(a, b, c)
    spell_boolean_selects(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.masked_fill.Scalar not in targets
    assert targets.count(torch.ops.aten.where.self) == 1, "the select between floats stays a where"
    for want, got in zip(expected, gm(a, b, c)):
        assert torch.equal(want, got)
