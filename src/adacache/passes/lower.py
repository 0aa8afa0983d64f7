"""Pass 4 (lower): adapt the portable cached graph to one backend.

The cache pass leaves ``torch.ops.higher_order.cond`` nodes, which ``torch.export``,
``torch.compile`` and the ONNX exporter understand. Called eagerly, that operator goes
through dispatcher machinery that costs hundreds of microseconds per call, which is the
whole budget of a cache decision on a small block. For eager execution the cond is
lowered to :func:`branch`, a plain Python ``if`` on the 0-d predicate.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from .insert_cache import STATE_COPY


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


def drop_state_copies(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove the cache-state copies that ``torch.cond`` forces on a reuse branch (eager only).

    A cond branch may not return one of its inputs, so the cache pass hands back copies of the
    cache state it passes through (tagged with ``STATE_COPY``). After
    :func:`lower_cond_to_python` that rule is gone, and the state tensors are owned by the
    runtime alone (nothing writes to them in place), so the branch can return them as they are.
    """
    for name, module in list(gm.named_children()):
        if not isinstance(module, fx.GraphModule) or not any(n.meta.get(STATE_COPY) for n in module.graph.nodes):
            continue
        # A new branch module over a copied graph: the portable graph keeps its copies.
        graph = copy.deepcopy(module.graph)
        for node in list(graph.nodes):
            if node.meta.get(STATE_COPY):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        graph.lint()
        setattr(gm, name, fx.GraphModule(module, graph, class_name=type(module).__name__))
    return gm


def _python_binding(op: torch._ops.OpOverload) -> Callable[..., Any] | None:
    """The generated C binding (``torch.add``, ``torch._C._nn.linear``) that runs ``op``, if any.

    Both are generated from the same operator schema, with the same argument names and
    order; the binding resolves the overload from the argument types, which for arguments
    valid for ``op`` selects ``op`` itself. Only the generated modules are searched, never the
    Python-level wrappers ``torch.split`` or ``torch.einsum`` put in front of some of them.
    """
    if op.namespace != "aten":
        return None
    if any(str(arg.type) == "List[Optional[Tensor]]" for arg in op._schema.arguments):
        return None  # the bindings refuse None in a list of optional tensors (index_put's indices)
    name = op.overloadpacket.__name__
    for module in (torch._C._VariableFunctions, torch._C._nn):
        binding = getattr(module, name, None)
        if binding is not None and type(binding).__name__ == "builtin_function_or_method":
            # FX must be able to name the binding in the code it generates; some bindings
            # (``__and__``, ``__or__``, ``__lshift__``, ``unique_dim``...) have no module and no
            # alias in ``torch``, so ``recompile`` would fail on them: keep the overload there.
            return binding if _fx_can_name(binding) else None
    return None


def _fx_can_name(fn: Callable[..., Any]) -> bool:
    """Whether FX's code generator can refer to ``fn`` (it names every call_function target)."""
    try:
        fx.node._get_qualified_name(fn)
    except RuntimeError:
        return False
    return True


def bind_operators(gm: fx.GraphModule) -> fx.GraphModule:
    """Call ATen operators through their generated Python bindings (for the eager backend).

    Captured graphs call ``torch.ops.aten.add.Tensor``-style overload objects, whose Python
    ``__call__`` costs 1-2 µs more per call than the binding ``torch.add``. A DiT step runs
    hundreds of such calls; on a GPU, where eager execution of a DiT is bound by the host
    launching kernels, that showed as the captured graph running 12-20% slower than the
    original module. ``gm``'s own graph is rewritten in place; its subgraph modules (shared
    with the portable graph) are replaced by rewritten copies.
    """
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            binding = _python_binding(node.target)
            if binding is not None:
                node.target = binding
    gm.graph.lint()
    gm.recompile()
    for name, child in list(gm.named_children()):
        if isinstance(child, fx.GraphModule):
            fresh = fx.GraphModule(child, copy.deepcopy(child.graph), class_name=type(child).__name__)
            setattr(gm, name, bind_operators(fresh))
    return gm


@torch.library.custom_op("adacache::dense_copy", mutates_args=())
def dense_copy(value: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that Inductor cannot see through (see :func:`pin_cond_operands`)."""
    return value.clone(memory_format=torch.contiguous_format)


@dense_copy.register_fake
def _dense_copy_fake(value: torch.Tensor) -> torch.Tensor:
    return torch.empty(value.shape, dtype=value.dtype, device=value.device)


def pin_cond_operands(gm: fx.GraphModule) -> fx.GraphModule:
    """Make the operands of every cond dense copies with a fixed layout (for Inductor only).

    Inductor compiles each cond branch for the strides its operands had when traced, and
    asserts them at run time; but where an operand is an intermediate it may give that buffer
    another layout, and ``contiguous()`` of a value that was contiguous when traced is no
    copy that could restore it. On Wan the transposed patch embedding reached a branch that way
    ("expected stride 16==1", which Dynamo then reports as "Attempt to trace generator"). A
    custom operator is opaque to Inductor: its output has exactly the layout its fake kernel
    declares. The copy costs one pass over each operand per step; eager and exported graphs
    keep their ``contiguous()``. ``gm``'s own graph is rewritten.
    """
    for node in list(gm.graph.nodes):
        feeds_cond = any(user.op == "call_function" and user.target is torch.ops.higher_order.cond for user in node.users)
        if node.op == "call_method" and node.target == "contiguous" and feeds_cond:
            with gm.graph.inserting_before(node):
                copy_node = gm.graph.call_function(torch.ops.adacache.dense_copy.default, (node.args[0],))
            copy_node.meta = dict(node.meta)
            node.replace_all_uses_with(copy_node)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def hoist_attributes(gm: fx.GraphModule) -> fx.GraphModule:
    """Make every ``get_attr`` of the top-level graph a plain instance attribute.

    FX code reads a nested attribute such as ``blocks.0.attn.qkv.weight`` through a chain of
    ``nn.Module.__getattr__`` calls on every forward, hundreds per step on a DiT. Bound once
    into the instance ``__dict__`` under a flat name, each read is a dictionary hit. The
    tensors and branch modules are the same objects (nothing is copied); for branch modules
    the bound ``forward`` is stored, skipping ``nn.Module.__call__`` (no hooks are used).
    """
    import operator as _operator

    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "get_attr"):
        value = _operator.attrgetter(str(node.target))(gm)
        name = f"_hoisted_{i}"
        if isinstance(value, fx.GraphModule):
            value = value.forward
        object.__setattr__(gm, name, value)  # bypass Module registration: a plain attribute
        node.target = name
    gm.graph.lint()
    gm.recompile()
    return gm
