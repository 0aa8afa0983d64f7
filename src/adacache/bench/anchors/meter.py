"""What an anchor really executed: forward pre-hooks inside the blocks count the attention,
feed-forward and block bodies that ran, weighted by their FLOPs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import first_parameter


@dataclass
class FlopProfile:
    """FLOPs per sample of one full forward, split by block and by attention / feed-forward."""

    total: float
    attn: list[float]
    ff: list[float]
    block_rest: list[float]


def flop_profile(model: nn.Module, blocks: nn.ModuleList) -> FlopProfile | None:
    """Count the FLOPs of one batch-1 forward of the untouched model.

    ``FlopCounterMode`` does not count the fused CPU attention kernel, so the attention core
    (``4 N^2 d`` per sample) is added from the shapes whenever no SDPA op was counted, which keeps
    CPU and GPU profiles alike.
    """
    from torch.utils.flop_counter import FlopCounterMode

    p = first_parameter(model)
    cfg = getattr(model, "config", None)
    if p is None or cfg is None:
        return None
    size, channels = int(cfg.sample_size), int(cfg.in_channels)
    x = torch.zeros(1, channels, size, size, device=p.device, dtype=p.dtype)
    t = torch.full((1,), 500, device=p.device, dtype=torch.long)
    y = torch.zeros(1, device=p.device, dtype=torch.long)
    q_shapes: dict[int, tuple[int, int]] = {}

    def grab(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            q_shapes[i] = (int(args[0].shape[-2]), int(module.out_features))

        return hook

    handles = [blk.attn1.to_q.register_forward_pre_hook(grab(i)) for i, blk in enumerate(blocks)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(hidden_states=x, timestep=t, class_labels=y)
    except Exception:  # noqa: BLE001 - a profile is a nicety; stats then report no FLOPs
        return None
    finally:
        for h in handles:
            h.remove()
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def flops(name: str) -> tuple[float, bool]:
        ops = counts.get(name, {})
        return float(sum(ops.values())), any("scaled_dot_product" in str(op) for op in ops)

    total, _ = flops(root)
    attn, ff, rest = [], [], []
    for i in range(len(blocks)):
        block_total, _ = flops(f"{root}.transformer_blocks.{i}")
        a, sdpa_counted = flops(f"{root}.transformer_blocks.{i}.attn1")
        f, _ = flops(f"{root}.transformer_blocks.{i}.ff")
        if not sdpa_counted and i in q_shapes:
            tokens, inner = q_shapes[i]
            core = 4.0 * tokens * tokens * inner
            a += core
            total += core
            block_total += core
        attn.append(a)
        ff.append(f)
        rest.append(max(0.0, block_total - a - f))
    if total <= 0:
        return None
    return FlopProfile(total, attn, ff, rest)


class WorkMeter:
    """Counts which block parts really ran, with forward pre-hooks inside the blocks.

    The hooks sit on ``attn1.to_q`` (attention ran), on the feed-forward's first layer (MLP ran)
    and on ``norm1`` (the block body ran).  Every anchor skips work by not calling these, so they
    fire only for computation that happened, whichever mechanism the anchor uses (block skip,
    module reuse, halved CFG batch).  The batch size of each execution weights its FLOPs.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        self.blocks = blocks
        self.profile = flop_profile(model, blocks)
        self.handles: list[Any] = []
        self.reset()

    def reset(self) -> None:
        self.units_run = 0
        self.flops_run = 0.0

    @property
    def attached(self) -> bool:
        return bool(self.handles)

    def attach(self) -> None:
        if self.handles:
            return
        prof = self.profile
        for i, blk in enumerate(self.blocks):
            attn_f = prof.attn[i] if prof else 0.0
            ff_f = prof.ff[i] if prof else 0.0
            rest_f = prof.block_rest[i] if prof else 0.0
            self.handles.append(blk.attn1.to_q.register_forward_pre_hook(self._counter(attn_f, unit=True)))
            self.handles.append(_ff_entry(blk).register_forward_pre_hook(self._counter(ff_f, unit=True)))
            self.handles.append(blk.norm1.register_forward_pre_hook(self._counter(rest_f, unit=False)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _counter(self, flops_per_sample: float, unit: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            rows = int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) else 1
            self.flops_run += flops_per_sample * rows
            if unit:
                self.units_run += 1

        return hook


def _ff_entry(block: nn.Module) -> nn.Module:
    """The first module a block's feed-forward calls (``ff.net[0]`` in diffusers' FeedForward)."""
    ff = block.ff
    net = getattr(ff, "net", None)
    if isinstance(net, nn.ModuleList) and len(net) > 0:
        return net[0]
    for sub in ff.modules():
        if isinstance(sub, nn.Linear):
            return sub
    return ff
