"""Readable views of what the passes did: graph structure, before/after diff, summaries."""

from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from . import ops
from .passes.contract import graph_name, name_group
from .passes.find_blocks import REGION_META
from .passes.lower import branch

_CACHE_OPS = {
    getattr(ops, name)
    for name in (
        "cache_load", "residual_of", "offset_score", "all_finite", "blend", "below", "taylor_forecast",
        "taylor_update", "adacorrection_score", "offset_scale", "correction_weight", "offset_decision", "correct", "one_like", "teacache_gate", "keep_if",
    )
}


def _arg_name(node: fx.Node) -> str:
    """Names that are stable across torch versions: inputs and adacache's own nodes."""
    if node.op == "placeholder" or node.target in _CACHE_OPS or node.target is operator.and_:
        return node.name
    return "_"


def _token(node: fx.Node) -> str | None:
    if node.op == "placeholder":
        return f"input {node.name}"
    if node.op == "get_attr":
        return None
    if node.op == "output":
        outs = node.args[0]
        return f"output x{len(outs) if isinstance(outs, (tuple, list)) else 1}"
    if node.op == "call_module":
        return f"call {node.target}"
    if node.target in (torch.ops.higher_order.cond, branch):
        pred, true_fn, false_fn = node.args[:3]
        return f"cond {pred.name} ? {true_fn.target} : {false_fn.target}"
    if node.target in _CACHE_OPS:
        return f"{node.target.__name__}({', '.join(_arg_name(a) for a in node.all_input_nodes)})"
    if node.target is operator.and_:
        return f"and({', '.join(_arg_name(a) for a in node.all_input_nodes)})"
    if node.target is operator.getitem and node.args[0].op == "call_function" and node.args[0].target in (torch.ops.higher_order.cond, branch):
        return None
    return "op"


def graph_structure(gm: fx.GraphModule, collapse_regions: bool = True) -> list[str]:
    """The top-level graph as a list of short lines, runs of ordinary ops collapsed.

    Cache nodes, site calls and conds are spelled out; ordinary aten ops become
    ``ops xN``; with ``collapse_regions`` the nodes of each tagged block become one
    ``block <name> [N nodes]`` line. Pinned by the graph-diff tests.
    """
    lines: list[str] = []
    run = 0
    region: str | None = None
    region_count = 0

    def flush() -> None:
        nonlocal run, region, region_count
        if run:
            lines.append(f"ops x{run}")
            run = 0
        if region is not None:
            lines.append(f"block {region} [{region_count} nodes]")
            region, region_count = None, 0

    for node in gm.graph.nodes:
        tag = node.meta.get(REGION_META) if collapse_regions and node.op == "call_function" else None
        if tag is not None and node.target not in _CACHE_OPS:
            if region != tag:
                flush()
                region = tag
            region_count += 1
            continue
        token = _token(node)
        if token is None:
            continue
        group = name_group(token.removeprefix("input ")) if token.startswith("input ") else None
        if group is not None:
            prefix = f"input {graph_name(group, '*')} x"  # a run of one group's inputs is one line
            if lines and lines[-1].startswith(prefix):
                count = int(lines.pop()[len(prefix):])
            else:
                flush()
                count = 0
            lines.append(f"{prefix}{count + 1}")
            continue
        if token == "op":
            if region is not None:
                flush()
            run += 1
            continue
        flush()
        lines.append(token)
    flush()
    return lines


def graph_diff(before: fx.GraphModule, after: fx.GraphModule) -> str:
    """A unified diff of :func:`graph_structure` before and after the cache passes."""
    return "\n".join(
        difflib.unified_diff(graph_structure(before), graph_structure(after), "captured", "cached", lineterm="", n=1)
    )


@dataclass
class SiteSummary:
    """Reuse statistics of one cache site."""

    site: str
    label: str
    reused: int
    calls: int
    flops_per_call: int | None  # None: not countable (a data-dependent op such as nonzero)

    @property
    def hit_rate(self) -> float:
        return self.reused / self.calls if self.calls else 0.0


@dataclass
class Summary:
    """What a session's caching did: hit rates, FLOPs skipped, cache memory."""

    policy: str
    sites: list[SiteSummary]
    calls: int
    generations: int
    captures: int
    invalidations: int
    nonfinite: int
    cache_bytes: int
    model_flops_per_call: int | None
    per_step: list[dict[str, Any]] = field(default_factory=list)
    replays: int = 0  # reflected calls (Z-Cache) that ran only the non-block part
    restarts: int = 0  # ambiguous request boundaries where the caches were cleared
    recaptures: list[str] = field(default_factory=list)  # why graphs were captured again

    @property
    def reflection_flops(self) -> float | None:
        """Extra FLOPs of reflected calls, as a share of the full-computation FLOPs of all calls."""
        if not self._flops_known:
            return None
        non_block = self.model_flops_per_call - sum(s.flops_per_call for s in self.sites)
        total = self.model_flops_per_call * self.calls
        return self.replays * max(0, non_block) / total if total else 0.0

    @property
    def hit_rate(self) -> float:
        """Share of site executions that were skipped."""
        calls = sum(s.calls for s in self.sites)
        return sum(s.reused for s in self.sites) / calls if calls else 0.0

    @property
    def _flops_known(self) -> bool:
        return self.model_flops_per_call is not None and all(s.flops_per_call is not None for s in self.sites)

    @property
    def flops_skipped(self) -> float | None:
        """Share of the model's FLOPs (over all calls) that reuse skipped; ``None`` when the
        model's FLOPs cannot be counted."""
        if not self._flops_known:
            return None
        total = self.model_flops_per_call * self.calls
        skipped = sum(s.reused * s.flops_per_call for s in self.sites)
        return skipped / total if total else 0.0

    @property
    def flop_bound_speedup(self) -> float | None:
        """The speedup if time were proportional to FLOPs (``None`` when they are unknown)."""
        skipped = self.flops_skipped
        return None if skipped is None else 1.0 / max(1e-9, 1.0 - skipped)

    def __str__(self) -> str:
        return self.format()

    def format(self, per_step: bool = True) -> str:
        """The summary as text; ``per_step=False`` leaves out the step-by-step reuse map."""
        head = [
            f"adacache summary: {self.policy}",
            f"  calls {self.calls} in {self.generations} generation(s), graphs captured {self.captures}, "
            f"cache invalidations {self.invalidations}, non-finite caches refused {self.nonfinite}"
            + (f", ambiguous request starts restarted {self.restarts}" if self.restarts else ""),
            f"  hit rate {self.hit_rate:.1%}, "
            + (f"FLOPs skipped {self.flops_skipped:.1%} (FLOP-bound speedup {self.flop_bound_speedup:.2f}x)"
               if self._flops_known else "FLOPs unknown (a data-dependent op such as nonzero, or code outside any captured graph in capture='blocks' mode)")
            + f", cache memory {self.cache_bytes / 2**20:.2f} MiB"
            + (f", reflection: {self.replays} replayed calls" if self.replays else "")
            + (f", {self.reflection_flops:.2%} extra FLOPs" if self.replays and self._flops_known else ""),
            *(f"  re-captured because the model changed: {reason}" for reason in self.recaptures),
            f"  {'site':<8} {'covers':<32} {'reused':>8} {'hit rate':>9} {'MFLOP/call':>11}",
        ]
        rows = [
            f"  {s.site:<8} {s.label:<32} {s.reused:>4}/{s.calls:<3} {s.hit_rate:>9.1%} "
            + (f"{s.flops_per_call / 1e6:>11.2f}" if s.flops_per_call is not None else f"{'unknown':>11}")
            for s in self.sites
        ]
        if self.per_step and per_step:
            sites = [s.site for s in self.sites if s.calls]
            rows.append("  per step (R = reused, . = computed), one column per site: " + " ".join(sites))
            for rec in self.per_step:
                marks = "".join("R" if rec["reused"].get(s) else "." for s in sites)
                rows.append(f"    step {rec['step']:>3} slot {rec['slot']}: {marks}")
        return "\n".join(head + rows)
