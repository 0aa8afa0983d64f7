"""Spans over model shapes beyond the plain stack of blocks.

Each model here puts code between its blocks the way a real family does; every caching
policy that spans all blocks used to fail on them with "its nodes are interleaved with
nodes of other modules". Each must now: equal the model exactly at computed steps, reuse
at the others, and stay finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import adacache

D = 16


class Mixer(nn.Module):
    """Attention + MLP over tokens, modulated by a conditioning vector; returns the update only."""

    def __init__(self, dim: int = D) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mod = nn.Linear(dim, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.norm(h) * (1 + self.mod(c)[:, None])
        return self.mlp(self.attn(x, x, x)[0])


class ResidualBlock(Mixer):
    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return h + super().forward(h, c)


class JointBlock(nn.Module):
    """Two streams in, two out (SD3 / Flux dual-stream style)."""

    def __init__(self) -> None:
        super().__init__()
        self.img, self.txt = Mixer(), Mixer()

    def forward(self, h: torch.Tensor, e: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        joint = torch.cat([e, h], dim=1)
        return e + self.txt(joint, c)[:, : e.shape[1]], h + self.img(joint, c)[:, e.shape[1] :]


class Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(4, D)
        self.temb = nn.Sequential(nn.Linear(1, D), nn.SiLU(), nn.Linear(D, D))
        self.proj_out = nn.Linear(D, 4)

    def embed(self, x: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj_in(x), self.temb(timestep[:, None] / 1000)


class ResidualOutsideBlocks(Base):
    """``h = h + block(h)``: the residual add sits between the blocks, not inside them."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Mixer() for _ in range(3)])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h, c = self.embed(x, timestep)
        for block in self.blocks:
            h = h + block(h, c)
        return self.proj_out(h)


class JointThenSingle(Base):
    """AuraFlow / Flux.2: dual-stream blocks, a concatenation, single-stream blocks, a slice."""

    def __init__(self) -> None:
        super().__init__()
        self.text_in = nn.Linear(6, D)
        self.joint_transformer_blocks = nn.ModuleList([JointBlock() for _ in range(2)])
        self.single_transformer_blocks = nn.ModuleList([ResidualBlock() for _ in range(2)])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h, c = self.embed(x, timestep)
        e = self.text_in(text)
        for block in self.joint_transformer_blocks:
            e, h = block(h, e, c)
        joint = torch.cat([e, h], dim=1)
        for block in self.single_transformer_blocks:
            joint = block(joint, c)
        return self.proj_out(joint[:, e.shape[1] :])


class SpatialBlock(ResidualBlock):
    pass


class TemporalBlock(ResidualBlock):
    pass


class SpatialTemporal(Base):
    """Video: spatial blocks over each frame's tokens, temporal blocks over each token's
    frames, with the reshapes between them."""

    _repeated_blocks = ("SpatialBlock", "TemporalBlock")

    def __init__(self) -> None:
        super().__init__()
        self.spatial = nn.ModuleList([SpatialBlock() for _ in range(2)])
        self.temporal = nn.ModuleList([TemporalBlock() for _ in range(2)])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        b, f, n, _ = x.shape
        h, c = self.embed(x, timestep)
        for spatial, temporal in zip(self.spatial, self.temporal):
            h = spatial(h.reshape(b * f, n, D), c.repeat_interleave(f, 0)).reshape(b, f, n, D)
            h = temporal(h.transpose(1, 2).reshape(b * n, f, D), c.repeat_interleave(n, 0))
            h = h.reshape(b, n, f, D).transpose(1, 2)
        return self.proj_out(h)


class ControlBlock(ResidualBlock):
    pass


class WithAuxiliaryStack(Base):
    """A control / VACE-style stack run beside the main one; its hints are added in between."""

    _repeated_blocks = ("ResidualBlock", "ControlBlock")

    def __init__(self) -> None:
        super().__init__()
        self.control_in = nn.Linear(4, D)
        self.blocks = nn.ModuleList([ResidualBlock() for _ in range(3)])
        self.control_blocks = nn.ModuleList([ControlBlock() for _ in range(3)])
        self.hint = nn.ModuleList([nn.Linear(D, D) for _ in range(3)])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        h, c = self.embed(x, timestep)
        k = self.control_in(control)
        for block, aux, hint in zip(self.blocks, self.control_blocks, self.hint):
            k = aux(k, c)
            h = block(h, c) + hint(k)
        return self.proj_out(h)


class GuidanceLayers(Base):
    """A small guidance MLP in a container named ``layers`` besides the real stack."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(D, D), nn.SiLU()) for _ in range(2)])
        self.transformer_blocks = nn.ModuleList([ResidualBlock() for _ in range(3)])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h, c = self.embed(x, timestep)
        g = c
        for layer in self.layers:
            g = layer(g)
        c = c + g
        for block in self.transformer_blocks:
            h = block(h, c)
        return self.proj_out(h)


def _inputs(model: nn.Module) -> Callable[[float], tuple[Any, ...]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, generator=gen)
    if isinstance(model, JointThenSingle):
        text = torch.randn(2, 5, 6, generator=gen)
        return lambda t: (x, torch.tensor([t, t]), text)
    if isinstance(model, SpatialTemporal):
        video = torch.randn(2, 3, 4, 4, generator=gen)
        return lambda t: (video, torch.tensor([t, t]))
    if isinstance(model, WithAuxiliaryStack):
        control = torch.randn(2, 8, 4, generator=gen)
        return lambda t: (x, torch.tensor([t, t]), control)
    return lambda t: (x, torch.tensor([t, t]))


SHAPES = [ResidualOutsideBlocks, JointThenSingle, SpatialTemporal, WithAuxiliaryStack, GuidanceLayers]
POLICIES = {
    "fora": adacache.FORA(interval=2),
    "fora_residual": adacache.FORA(interval=2, reuse="residual"),
    "taylorseer": adacache.TaylorSeer(order=1, interval=2),
    "first_block_cache": adacache.FirstBlockCache(10.0),
    "adacorrection": adacache.AdaCorrection(base=adacache.FORA(interval=2), veto=1.0),
}
TIMESTEPS = [999.0, 950.0, 900.0, 850.0, 800.0]


@pytest.mark.parametrize("policy", list(POLICIES.values()), ids=list(POLICIES))
@pytest.mark.parametrize("shape", SHAPES, ids=[s.__name__ for s in SHAPES])
def test_span_policies_run_on_every_model_shape(shape, policy):
    torch.manual_seed(0)
    model = shape().eval()
    inputs = _inputs(model)
    compiled = adacache.compile(model, policy)
    reused_steps = 0
    with torch.no_grad():
        compiled.adacache.new_request(total_steps=len(TIMESTEPS))
        for t in TIMESTEPS:
            out = compiled(*inputs(t))
            record = compiled.adacache.current_session().stats.records[-1]
            reused = any(bool(flag) for flag in record.reused.values())
            reused_steps += reused
            assert torch.isfinite(out).all()
            if not reused:
                assert torch.equal(out, model(*inputs(t))), "a computed step must equal the model"
    assert reused_steps > 0, f"{shape.__name__}: nothing reused under {policy.describe()}"


@pytest.mark.parametrize("shape", SHAPES, ids=[s.__name__ for s in SHAPES])
def test_nothing_cached_equals_the_model_on_every_shape(shape):
    torch.manual_seed(0)
    model = shape().eval()
    inputs = _inputs(model)
    compiled = adacache.compile(model, adacache.NoCache())
    with torch.no_grad():
        for t in TIMESTEPS[:2]:
            assert torch.equal(compiled(*inputs(t)), model(*inputs(t)))


def test_a_span_covers_the_code_between_blocks_and_moves_out_what_does_not_depend_on_them():
    model = JointThenSingle().eval()
    policy = adacache.FORA(interval=2, reuse="residual")
    compiled = adacache.compile(model, policy, example_inputs=(_inputs(model)(999.0), {}))
    program = compiled.adacache.programs[0]
    (site,) = program.cached_sites
    assert site.label.startswith("joint_transformer_blocks.0") and "single_transformer_blocks.1" in site.label
    inner = program.portable.get_submodule("site_0_compute").site
    targets = [str(n.target) for n in inner.graph.nodes if n.op == "call_function"]
    assert "aten.cat.default" in targets, "the concatenation between the stacks is part of the span"
    assert "aten.slice.Tensor" in targets, "the trailing slice is taken in so the span ends on a stream"
    # Its one output is a residual of the image stream: reuse adds it to the current input.
    region = site.regions[0]
    assert region.is_residual and len(region.outputs) == 1


def test_a_guidance_mlp_in_a_layers_container_is_not_taken_for_blocks():
    model = GuidanceLayers().eval()
    compiled = adacache.compile(model, adacache.FirstBlockCache(0.5), example_inputs=(_inputs(model)(999.0), {}))
    program = compiled.adacache.programs[0]
    assert [b.name for b in program.blocks] == [f"transformer_blocks.{i}" for i in range(3)]
    probe = next(s for s in program.layout.sites if s.role == "probe")
    assert probe.label == "transformer_blocks.0", "the first *transformer* block is the probe"
