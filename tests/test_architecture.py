"""The package's shape (issue 29): what imports what, and who may read a graph name."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import adacache

PACKAGE = Path(adacache.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every import between the package's modules, lazy and TYPE_CHECKING ones included.

    ``from . import x`` where ``x`` is a module is an edge to that module alone, not to the
    package whose ``__init__`` holds it.
    """
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                members = [f"{source}.{alias.name}" for alias in node.names]
                candidates = members if all(m in modules for m in members) else [source, *members]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in modules and c != name}
        graph[name] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "adacache.passes.contract" in graph["adacache.passes.insert_cache"]
    assert "adacache.runtime.guards" in graph["adacache.runtime.programs"]  # `from . import guards`
    assert "adacache.runtime" not in graph["adacache.runtime.programs"]


def test_no_import_cycle_in_the_package():
    """Lazy imports included: a cycle through a function-level import is still a cycle."""
    assert import_cycles(import_graph()) == []


def test_each_anchor_system_is_one_module():
    """The bench's anchors: one module per system, assembled by the package (issue 29, stage 5)."""
    from adacache.bench import anchors
    from adacache.bench.anchors import cache_dit_dbcache, diffusers_hooks

    assert {m.SYSTEM for m in (diffusers_hooks, cache_dit_dbcache)} == set(anchors.supported_anchors())
    for system in (diffusers_hooks, cache_dit_dbcache):
        assert {c.system for c in system.sweeps(False, 50)} == {system.SYSTEM}
        assert {c.method for c in system.sweeps(False, 50)} == set(system.METHODS)
    graph = import_graph()
    assert "adacache.bench.anchors.cache_dit_dbcache" not in graph["adacache.bench.anchors.diffusers_hooks"]
    assert "adacache.bench.anchors.diffusers_hooks" not in graph["adacache.bench.anchors.cache_dit_dbcache"]


def test_only_the_contract_reads_graph_names():
    """State, control and signal names are made by ``contract.graph_name``; everything else
    reads the layout's specs (or ``contract.name_group``), never the name's text."""
    readers = {"split", "rsplit", "partition", "rpartition", "startswith", "endswith", "removeprefix", "removesuffix"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).as_posix() == "passes/contract.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in readers:
                literals = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                if any("__" in text for text in literals):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_a_session_runs_on_what_it_is_handed():
    """A session needs no runtime: a program cache and step inputs are all it calls, and it
    gives what the compiled model gives."""
    from adacache.runtime.programs import ProgramCache
    from adacache.runtime.session import Session
    from adacache.runtime.step_inputs import StepInputs
    from families import FAMILIES

    model, inputs, _ = FAMILIES["tiny_dit"]()
    policy = adacache.FORA(interval=2)
    session = Session(ProgramCache(model, policy), StepInputs(model, policy))
    compiled = adacache.compile(model, policy)
    timesteps = torch.linspace(950, 50, 6)
    with torch.no_grad(), adacache.session(compiled, total_steps=len(timesteps)):
        session.begin_request(len(timesteps))
        for t in timesteps:
            assert torch.equal(session.call((), inputs(t)), compiled(**inputs(t)))
    reused = [any(bool(v) for v in record.reused.values()) for record in session.stats.records]
    assert reused == [False, True] * 3
    assert reused == [any(row["reused"].values()) for row in adacache.summary(compiled).per_step]


def test_the_compile_pipeline_is_one_function():
    """``compiler.compile_graph`` runs capture, then ``rewrite``: find blocks, plan, outline,
    insert, lower in that order, and the runtime's programs are made by it (or, in blocks
    mode, by ``blockwise.compile_blockwise``, which calls the same ``rewrite`` per run)."""
    from adacache import compiler
    from adacache.runtime import program
    from families import FAMILIES

    source = ast.parse(Path(compiler.__file__).read_text())
    called = []
    for function in ("compile_graph", "rewrite"):
        body = next(n for n in source.body if isinstance(n, ast.FunctionDef) and n.name == function)
        called += [n.func.id if isinstance(n.func, ast.Name) else n.func.attr for n in ast.walk(body) if isinstance(n, ast.Call)]
    order = ["capture", "rewrite", "find_blocks", "plan", "outline_sites", "insert_cache_nodes", "lower"]
    assert [c for c in called if c in order] == order
    assert "compile_graph" in Path(program.__file__).read_text() and "compile_blockwise" in Path(program.__file__).read_text()

    model, inputs, _ = FAMILIES["tiny_dit"]()
    compiled = adacache.compile(model, adacache.FORA(interval=2))
    compiled.adacache.prepare(**inputs(torch.tensor(500.0)))
    graph = compiler.compile_graph(model, adacache.FORA(interval=2), (), inputs(torch.tensor(500.0)))
    assert [s.name for s in graph.layout.sites] == [s.name for s in compiled.adacache.programs[0].layout.sites]
    assert [s.name for s in graph.layout.states] == [s.name for s in compiled.adacache.programs[0].layout.states]


def test_no_pass_function_is_long():
    """Each pass composes small functions (issue 29: none over about 60 lines)."""
    long = []
    for path in (PACKAGE / "passes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
