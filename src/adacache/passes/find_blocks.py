"""Pass 1 (annotate): find the repeated transformer blocks and tag their nodes.

Blocks are found from the graph's ``nn_module_stack`` metadata, guided by the model's own
hints: diffusers' ``_repeated_blocks`` class names, the usual block containers
(``transformer_blocks``, ``single_transformer_blocks``, ``blocks``, ``layers``...), or a
user pattern. The pass changes no computation; it writes ``node.meta["adacache_region"]``
and returns the blocks it found.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import fx, nn

from ..errors import CaptureError, NotEligibleError
from .regions import DATA_DEPENDENT_SHAPE, Region, build_region, compute_order, is_compute_node, tensor_meta

BLOCK_CONTAINERS = (
    "transformer_blocks",
    "single_transformer_blocks",
    "joint_transformer_blocks",
    "blocks",
    "layers",
)
# Children of a block cached at the "module" granularity: attention and feed-forward, known
# by their class name or by the names diffusers gives them.
_ATTENTION_TYPE = re.compile(r"Attention$")
_ATTENTION_NAME = re.compile(r"^(attn\d*|attention|self_attn|cross_attn)$")
_FEED_FORWARD_TYPE = re.compile(r"(FeedForward|Mlp|MLP)$")
_FEED_FORWARD_NAME = re.compile(r"^(ff|ff_context|mlp|feed_forward)$")


def is_attention(name: str, module_type: str) -> bool:
    """Whether the child of a block called ``name`` (its last path component) with class
    ``module_type`` is an attention call."""
    return bool(_ATTENTION_TYPE.search(module_type.rsplit(".", 1)[-1]) or _ATTENTION_NAME.match(name))


def _is_feed_forward(name: str, module_type: str) -> bool:
    return bool(_FEED_FORWARD_TYPE.search(module_type.rsplit(".", 1)[-1]) or _FEED_FORWARD_NAME.match(name))

REGION_META = "adacache_region"


def candidate_block_names(model: nn.Module, pattern: str | Sequence[str] | None = None) -> list[str]:
    """Qualified names of the modules that may be transformer blocks, outermost only."""
    names: list[str] = []
    if pattern is not None:
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        names = [n for n, _ in model.named_modules() if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    else:
        repeated = set(getattr(model, "_repeated_blocks", None) or ())
        for name, module in model.named_modules():
            if not name:
                continue
            if type(module).__name__ in repeated:
                names.append(name)
            elif isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_CONTAINERS:
                names.extend(f"{name}.{child}" for child, _ in module.named_children())
    names = sorted(set(names), key=lambda n: (n.count("."), n))
    outermost: list[str] = []
    for name in names:
        if not any(name.startswith(parent + ".") for parent in outermost):
            outermost.append(name)
    return outermost


def _stack(node: fx.Node) -> list[tuple[str, str, str]]:
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, path, str(typ)) for key, (path, typ) in stack.items()]


def _group(nodes: list[fx.Node], wanted: set[str], under: str | None = None) -> dict[str, tuple[str, str, list[fx.Node]]]:
    """Group nodes by the stack key of the outermost call of a ``wanted`` module."""
    groups: dict[str, tuple[str, str, list[fx.Node]]] = {}
    for node in nodes:
        stack = _stack(node)
        if under is not None:
            keys = [k for k, _, _ in stack]
            if under not in keys:
                continue
            stack = stack[keys.index(under) + 1 :]
        for key, path, typ in stack:
            if path in wanted:
                groups.setdefault(key, (path, typ, []))[2].append(node)
                break
    return groups


def find_blocks(
    gm: fx.GraphModule,
    model: nn.Module,
    pattern: str | Sequence[str] | None = None,
    *,
    with_submodules: bool = True,
) -> list[Region]:
    """Find the eligible transformer blocks of a captured model and tag their nodes.

    A block is eligible when its nodes are contiguous in the graph and every output is a
    residual stream with the shape of one of its inputs (multi-stream blocks such as Flux
    or SD3 joint blocks have one stream per output).

    Args:
        gm: the captured graph (see :func:`adacache.capture.capture`).
        model: the module that was captured; its structure gives the block hints.
        pattern: glob(s) over qualified module names (``"transformer_blocks.*"``) that
            override the automatic search.
        with_submodules: also find the attention / feed-forward calls inside each block,
            for policies that cache at that finer granularity.

    Returns:
        The eligible blocks in graph order; ineligible ones are left out.

    Raises:
        NotEligibleError: no eligible block was found; says what was searched and why
            each candidate was rejected.
    """
    names = candidate_block_names(model, pattern)
    order = compute_order(gm)
    compute = [n for n in gm.graph.nodes if is_compute_node(n)]
    blocks, rejected = _eligible_blocks(_group(compute, set(names)), order)
    _drop_blocks_without_tokens(blocks, rejected)
    blocks.sort(key=lambda r: order[r.nodes[0]])
    if not blocks:
        if rejected and all(reason.endswith(DATA_DEPENDENT_SHAPE) for reason in rejected):
            raise CaptureError(
                f"{type(model).__name__} was captured, but the shapes of its blocks depend on tensor values "
                f"({rejected[0]}), so no cache of a fixed shape can stand for them. capture='blocks' captures each run "
                "of blocks on the shapes of each call (capture='auto' falls back to it)"
            )
        raise _no_blocks_error(model, pattern, names, rejected)
    for block in blocks:
        for node in block.nodes:
            node.meta[REGION_META] = block.name
        if with_submodules:
            block.submodules = _find_submodules(block, order)
            for sub in block.submodules:
                sub.cross_attention = _says_cross_attention(model, sub.name)
    return blocks


def _eligible_blocks(groups: dict[str, tuple[str, str, list[fx.Node]]], order: dict[fx.Node, int]) -> tuple[list[Region], list[str]]:
    """The candidate calls that are eligible blocks, and a reason for each one that is not."""
    blocks: list[Region] = []
    rejected: list[str] = []
    calls_per_module: dict[str, int] = {}
    for path, _, _ in groups.values():
        calls_per_module[path] = calls_per_module.get(path, 0) + 1
    for key, (path, typ, nodes) in groups.items():
        region = build_region(path, key, typ, nodes, order)
        if region.eligible and calls_per_module[path] > 1:
            region.reason = f"it is called {calls_per_module[path]} times per forward"
        if region.eligible and not region.is_residual:
            missing = [o.name for i, o in enumerate(region.outputs) if i not in region.streams]
            region.reason = f"output(s) {missing} have no input of the same shape: not a residual block"
        if not region.eligible:
            rejected.append(f"{path}: {region.reason}")
            continue
        blocks.append(region)
    return blocks, rejected


def _drop_blocks_without_tokens(blocks: list[Region], rejected: list[str]) -> None:
    """A guidance or timestep MLP kept in a container named ``layers``, beside the real stack,
    is not a transformer block: spanning it would fold the conditioning into the cache and
    make it FirstBlockCache's probe. Dropped (with its reason) when other blocks carry tokens."""
    if not any(_carries_tokens(b) for b in blocks):
        return
    for block in [b for b in blocks if not _carries_tokens(b)]:
        shapes = [list(tensor_meta(o).shape) for o in block.outputs]
        rejected.append(f"{block.name}: its outputs {shapes} are not token sequences (batch, tokens, ...) as the other blocks' are")
        blocks.remove(block)


def _no_blocks_error(model: nn.Module, pattern: str | Sequence[str] | None, names: list[str], rejected: list[str]) -> NotEligibleError:
    searched = (
        f"modules matching {pattern!r}"
        if pattern is not None
        else "modules listed in `_repeated_blocks` and children of containers named " + ", ".join(BLOCK_CONTAINERS)
    )
    found = f" Candidates found: {len(names)}" + (": " + "; ".join(rejected[:5]) if rejected else "") + "."
    return NotEligibleError(
        f"{type(model).__name__} has no eligible transformer blocks. Searched {searched}.{found} "
        "Pass `blocks=` with a glob over qualified module names, for example "
        "adacache.compile(model, policy, blocks=\"my_blocks.*\")."
    )


def _carries_tokens(region: Region) -> bool:
    """Whether the block's streams are sequences (at least batch x tokens x channels)."""
    return all(tensor_meta(o) is not None and tensor_meta(o).dim() >= 3 for o in region.outputs)


def _says_cross_attention(model: nn.Module, path: str) -> bool | None:
    """What the module at ``path`` says of itself (diffusers' attention classes set
    ``is_cross_attention``); None for a module that does not say, or a path that is not one
    of ``model``'s (a run of blocks captured on its own)."""
    try:
        flag = getattr(model.get_submodule(path), "is_cross_attention", None)
    except AttributeError:
        return None
    return flag if isinstance(flag, bool) else None


def _find_submodules(block: Region, order: dict[fx.Node, int]) -> list[Region]:
    """Attention and feed-forward calls directly inside ``block``, each as its own region."""
    wanted: set[str] = set()
    prefix = block.name + "."
    for node in block.nodes:
        for _, path, typ in _stack(node):
            if not path.startswith(prefix):
                continue
            child = path[len(prefix) :]
            if "." in child:
                continue
            if is_attention(child, typ) or _is_feed_forward(child, typ):
                wanted.add(path)
    subs = []
    for key, (path, typ, nodes) in _group(block.nodes, wanted, under=block.key).items():
        region = build_region(path, key, typ, nodes, order)
        if region.eligible:
            subs.append(region)
    subs.sort(key=lambda r: order[r.nodes[0]])
    return subs
