"""Capture a model run by run of its blocks, where ``torch.export`` cannot capture it whole.

Models mostly fail whole-model export in code *around* their blocks (Lumina2 packs each
caption to its own length with ``mask.sum(1).tolist()``); the blocks themselves trace. In
``capture="blocks"`` mode the model's own ``forward`` stays the outer program, run eagerly,
and what is captured is each *run* of blocks:

1. :func:`record_block_runs` makes one eager call with every block routed through a recorder,
   under a :class:`~torch.overrides.TorchFunctionMode` that sees which block outputs the
   model's own code reads, and splits the block calls into runs (:class:`RunPlan`);
2. a :class:`RunModule` replays one run (the run's outside tensors in, the last block's
   output out) and is captured and rewritten like a whole model;
3. at every call the model's ``forward`` runs on a :func:`routed_copy` of the model whose
   blocks hand their calls to the thread's router (see :mod:`adacache.blockwise`).

A **run** is a sequence of consecutive block calls where each block reads the previous
block's output, every tensor it reads is either an output of a block of the run or one of
the tensors the run's first block was given (a mask, a rotary embedding, a timestep
embedding), and no output but the last block's is read by anything outside the run. So
the model never needs a value a reused run did not produce; a model that reads a middle
output (``h = h + block(h)``, a list of every block's output) gets a run per block.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import CaptureError
from .isolation import structural_copy


@dataclass(frozen=True)
class Leaf:
    """Where one flat input leaf of a block call comes from, within its run.

    ``external``: the run's ``index``-th outside tensor; ``link``: leaf ``index`` of the
    output of the run's ``call``-th call; ``const``: a non-tensor value, the same at every call.
    """

    kind: Literal["external", "link", "const"]
    index: int = 0
    call: int = 0
    value: Any = None


@dataclass
class BlockCall:
    """One recorded call of one block: its inputs' structure and sources, its output's structure."""

    name: str
    in_spec: pytree.TreeSpec
    leaves: list[Leaf]
    out_spec: pytree.TreeSpec


@dataclass
class RunPlan:
    """A run of block calls and the outside tensors it reads (all given to its first call)."""

    calls: list[BlockCall] = field(default_factory=list)
    num_externals: int = 0

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def describe(self) -> str:
        first, last = self.calls[0].name, self.calls[-1].name
        return first if len(self.calls) == 1 else f"{first}..{last}"


# -- routing block calls ----------------------------------------------------------------------

#: The router of the call running in this thread: ``router(name, block, args, kwargs)``.
_ACTIVE = threading.local()

BlockRouter = Callable[[str, nn.Module, tuple[Any, ...], dict[str, Any]], Any]


class routing:
    """Route this thread's calls of a :func:`routed_copy`'s blocks to ``router`` while active."""

    def __init__(self, router: BlockRouter) -> None:
        self.router = router

    def __enter__(self) -> None:
        self.outer = getattr(_ACTIVE, "router", None)
        _ACTIVE.router = self.router

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.router = self.outer


def _routed_block(name: str, block: nn.Module) -> nn.Module:
    """A stand-in for ``block`` that shares all its state (parameters, submodules, attributes
    read through the same tables) and hands its calls to the thread's router."""
    stand_in = object.__new__(type(block))
    vars(stand_in).update(vars(block))
    # Hooks run once, on the block itself, when the router calls it.
    for table in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
        if table in vars(stand_in):
            vars(stand_in)[table] = type(vars(block)[table])()

    def forward(*args: Any, **kwargs: Any) -> Any:
        router = getattr(_ACTIVE, "router", None)
        return block(*args, **kwargs) if router is None else router(name, block, args, kwargs)

    vars(stand_in)["forward"] = forward
    return stand_in


def routed_copy(model: nn.Module, names: list[str]) -> nn.Module:
    """A :func:`~adacache.capture.isolation.structural_copy` of ``model`` (new module objects
    over the same tensors) in which each named block is a routed stand-in for the user's block.

    The model's own code runs on the copy, so what it does to its modules while running
    (OmniGen's rotary embedding replaces its ``inv_freq`` buffer at every call) stays in the
    copy: the user's model, which other threads and the guards read, is never changed.
    """
    root = structural_copy(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        vars(root.get_submodule(parent))["_modules"][child] = _routed_block(name, model.get_submodule(name))
    return root


# -- recording the first call -------------------------------------------------------------------

#: Tensor methods that read only metadata: reading a block output's shape is not reading it.
_METADATA_READS = {"shape", "size", "dim", "ndim", "dtype", "device", "__len__", "numel", "is_floating_point",
                   "requires_grad", "is_cuda", "layout", "is_complex", "element_size"}


@dataclass(frozen=True)
class _Made:
    """A block output, where the recording meets it again: output ``leaf`` of call ``call``.
    Only its metadata is kept, so that recording holds no activation alive."""

    call: int
    leaf: int
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def example(self) -> torch.Tensor:
        """A tensor of its layout (export and fake-tensor runs read no values)."""
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)


def _read_name(func: Any) -> str | None:
    """``size`` for ``x.size()``, ``shape`` for ``x.shape`` (a property read arrives as its
    descriptor's ``__get__``)."""
    name = getattr(func, "__name__", None)
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None)
    return name


class _ReadTracker(TorchFunctionMode):
    """Notes which block outputs code outside the blocks reads, as ``(call, leaf)``."""

    def __init__(self, produced: dict[int, _Made], reads: set[tuple[int, int]], inside: list[bool]) -> None:
        super().__init__()
        self.produced, self.reads, self.inside = produced, reads, inside

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not self.inside[0] and _read_name(func) not in _METADATA_READS:
            for leaf in pytree.tree_leaves((args, kwargs)):
                made = self.produced.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
                if made is not None:
                    self.reads.add((made.call, made.leaf))
        return func(*args, **kwargs)


@dataclass
class Recording:
    """What one recorded call found: the runs, each run's outside tensors in that call (the
    examples its graph is first captured with) and the structure of the model's output."""

    runs: list[RunPlan]
    examples: list[list[torch.Tensor]]
    out_spec: pytree.TreeSpec
    num_outputs: int


@dataclass
class _Observed:
    """One block call: its input leaves (values, tensors no block made - kept, so their
    identity stays theirs - and :class:`_Made` for block outputs) and its output leaves."""

    name: str
    in_spec: pytree.TreeSpec
    inputs: list[Any]
    out_spec: pytree.TreeSpec
    outputs: list[Any]


def record_block_runs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], names: list[str]) -> Recording:
    """Call ``model`` once, eagerly, and split its calls of the blocks ``names`` into runs.

    Block outputs are followed by identity while they live (a weak reference drops each from
    the table when the model lets it go), so the recording costs no more memory than the call.

    Raises:
        CaptureError: none of the blocks was called through the model's module tree.
    """
    observed: list[_Observed] = []
    produced: dict[int, _Made] = {}  # id(live block output) -> where it came from
    reads: set[tuple[int, int]] = set()
    inside = [False]

    def record(name: str, block: nn.Module, call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> Any:
        leaves, in_spec = pytree.tree_flatten((call_args, call_kwargs))
        inputs = [produced.get(id(leaf), leaf) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        inside[0] = True
        try:
            out = block(*call_args, **call_kwargs)
        finally:
            inside[0] = False
        outputs, out_spec = pytree.tree_flatten(out)
        metas: list[Any] = []
        for j, leaf in enumerate(outputs):
            if isinstance(leaf, torch.Tensor) and id(leaf) not in produced:
                made = _Made(len(observed), j, leaf.shape, tuple(leaf.stride()), leaf.dtype, leaf.device)
                produced[id(leaf)] = made
                weakref.finalize(leaf, produced.pop, id(leaf), None)
                metas.append(made)
            else:
                metas.append(produced.get(id(leaf), leaf) if isinstance(leaf, torch.Tensor) else leaf)
        observed.append(_Observed(name, in_spec, inputs, out_spec, metas))
        return out

    with torch.no_grad(), routing(record), _ReadTracker(produced, reads, inside):
        result = routed_copy(model, names)(*args, **kwargs)
    outputs, out_spec = pytree.tree_flatten(result)
    for leaf in outputs:  # what the model returns, its caller reads
        made = produced.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
        if made is not None:
            reads.add((made.call, made.leaf))
    if not observed:
        raise CaptureError(
            f"{type(model).__name__} called none of its blocks ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) "
            "through its module tree, so capture='blocks' has nothing to capture (a block kept in a plain Python list "
            "is called around it); pass blocks= naming the modules its forward calls"
        )
    runs = _split(observed, reads)
    plans = [_plan(observed, run) for run in runs]
    examples = [_externals(observed, run, plan) for run, plan in zip(runs, plans)]
    return Recording(plans, examples, out_spec, len(outputs))


def _identity(leaf: Any) -> Any:
    """What makes two input leaves the same tensor: a block output's origin, else the object."""
    return (leaf.call, leaf.leaf) if isinstance(leaf, _Made) else ("tensor", id(leaf))


def _tensors(leaves: list[Any]) -> list[Any]:
    return [leaf for leaf in leaves if isinstance(leaf, (torch.Tensor, _Made))]


def _split(observed: list[_Observed], reads: set[tuple[int, int]]) -> list[list[int]]:
    """Consecutive calls grouped into runs (see the module docstring), ending a run early
    wherever a middle output turns out to be read outside it."""
    must_end: set[int] = set()
    while True:
        runs: list[list[int]] = [[0]]
        for p in range(1, len(observed)):
            if p - 1 not in must_end and _continues(observed, runs[-1], p):
                runs[-1].append(p)
            else:
                runs.append([p])
        broken = _middle_outputs_read_outside(observed, reads, runs)
        if not broken:
            return runs
        must_end |= broken


def _continues(observed: list[_Observed], run: list[int], p: int) -> bool:
    """Whether call ``p`` may join ``run``: it reads the previous call's output, and every
    other tensor it reads is a run output or was given to the run's first call."""
    members = set(run)
    inside = lambda leaf: isinstance(leaf, _Made) and leaf.call in members  # noqa: E731
    given = {_identity(leaf) for leaf in _tensors(observed[run[0]].inputs) if not inside(leaf)}
    reads_previous = False
    for leaf in _tensors(observed[p].inputs):
        if inside(leaf):
            reads_previous |= leaf.call == p - 1
        elif _identity(leaf) not in given:
            return False
    return reads_previous


def _middle_outputs_read_outside(observed: list[_Observed], reads: set[tuple[int, int]], runs: list[list[int]]) -> set[int]:
    """Calls that are not last in their run but whose output the model's code, or a block of
    another run, reads."""
    run_of = {p: r for r, run in enumerate(runs) for p in run}
    read_elsewhere = set(reads)
    for p, call in enumerate(observed):
        for leaf in _tensors(call.inputs):
            if isinstance(leaf, _Made) and run_of[leaf.call] != run_of[p]:
                read_elsewhere.add((leaf.call, leaf.leaf))
    return {p for run in runs for p in run[:-1] if any((p, j) in read_elsewhere for j in range(len(observed[p].outputs)))}


def _plan(observed: list[_Observed], run: list[int]) -> RunPlan:
    position = {p: i for i, p in enumerate(run)}
    externals: dict[Any, int] = {}
    plan = RunPlan()
    for p in run:
        call = observed[p]
        leaves = []
        for leaf in call.inputs:
            if not isinstance(leaf, (torch.Tensor, _Made)):
                leaves.append(Leaf("const", value=leaf))
            elif isinstance(leaf, _Made) and leaf.call in position:
                leaves.append(Leaf("link", index=leaf.leaf, call=position[leaf.call]))
            else:
                leaves.append(Leaf("external", index=externals.setdefault(_identity(leaf), len(externals))))
        plan.calls.append(BlockCall(call.name, call.in_spec, leaves, call.out_spec))
    plan.num_externals = len(externals)
    return plan


def _externals(observed: list[_Observed], run: list[int], plan: RunPlan) -> list[torch.Tensor]:
    """The run's outside tensors as the recorded call gave them, in the plan's order (a block
    output of an earlier run, no longer held, as a tensor of its layout)."""
    found: list[Any] = [None] * plan.num_externals
    for p, call in zip(run, plan.calls):
        for template, value in zip(call.leaves, observed[p].inputs):
            if template.kind == "external":
                found[template.index] = value.example() if isinstance(value, _Made) else value
    return found


# -- what is captured ---------------------------------------------------------------------------

class RunModule(nn.Module):
    """One run of blocks as a module: the run's outside tensors in, the last block's output
    out. The blocks are registered under their qualified names in the model (``layers.3``),
    so the captured graph names them as the whole model's graph would."""

    def __init__(self, model: nn.Module, plan: RunPlan) -> None:
        super().__init__()
        self.plan = plan
        for name in dict.fromkeys(plan.names):
            holder: nn.Module = self
            *parents, child = name.split(".")
            for part in parents:
                if part not in holder._modules:
                    holder.add_module(part, nn.Module())
                holder = holder._modules[part]
            holder.add_module(child, model.get_submodule(name))

    def forward(self, *externals: torch.Tensor) -> Any:
        return self.forward_all(*externals)[-1]

    def forward_all(self, *externals: torch.Tensor) -> list[Any]:
        """Every call's output, in order (the last is the run's)."""
        outputs: list[Any] = []
        flat_outputs: list[list[Any]] = []
        for call in self.plan.calls:
            leaves = [
                externals[leaf.index] if leaf.kind == "external"
                else flat_outputs[leaf.call][leaf.index] if leaf.kind == "link" else leaf.value
                for leaf in call.leaves
            ]
            args, kwargs = pytree.tree_unflatten(leaves, call.in_spec)
            out = self.get_submodule(call.name)(*args, **kwargs)
            outputs.append(out)
            flat_outputs.append(pytree.tree_leaves(out))
        return outputs


class PendingOutput(torch.Tensor):
    """A block output in the middle of a run: the model may pass it to the next block or
    read its shape, but has no value (a reused run never computes it). Computing with it
    raises a :class:`CaptureError`."""

    block: str

    @staticmethod
    def __new__(cls, shape: torch.Size, dtype: torch.dtype, device: torch.device, block: str) -> "PendingOutput":
        pending = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)
        pending.block = block
        return pending

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        blocks = [a.block for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, PendingOutput)]
        raise CaptureError(
            f"the model computed with the output of block {blocks[0]!r} ({func}), which capture='blocks' mode does not "
            "compute: when the model was recorded, that output only went to the next block. The model reads its block "
            "outputs differently from call to call; compile it with blocks= naming fewer blocks"
        )

    def __repr__(self) -> str:  # type: ignore[override]
        return f"PendingOutput(block={self.block!r}, shape={list(self.shape)}, dtype={self.dtype})"
