"""``capture="blocks"``: the model's own code runs eagerly and each run of its blocks is a
captured, rewritten graph; ``"auto"`` falls back to it where whole-model export fails."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import adacache
from families import FAMILIES
from helpers import denoise, moving, new_request

D = 16


def reuse_map(model: nn.Module) -> list[bool]:
    return [any(bool(v) for v in row["reused"].values()) for row in adacache.summary(model).per_step]


@pytest.mark.parametrize("family", ["tiny_dit", "sd3", "flux", "wan"])
def test_nothing_cached_in_blocks_mode_equals_the_model(family):
    model, inputs, _ = FAMILIES[family]()
    expected = denoise(model, moving(inputs), steps=3)
    compiled = adacache.compile(model, adacache.NoCache(), capture="blocks")
    got = denoise(compiled, moving(inputs), steps=3)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"step {step}: {float((a - b).abs().max())}"
    assert compiled.adacache.programs[0].mode == "blocks"


#: FirstBlockCache thresholds that reuse at some steps and compute at others on each family.
PROBE_THRESHOLDS = {"tiny_dit": 1.5, "sd3": 1.0, "wan": 0.5}
SAME_AS_GRAPH = [
    (family, policy)
    for family, threshold in PROBE_THRESHOLDS.items()
    for policy in (adacache.FORA(interval=2), adacache.TaylorSeer(order=1, interval=2), adacache.FirstBlockCache(threshold))
]


@pytest.mark.parametrize("family, policy", SAME_AS_GRAPH, ids=[f"{f}-{type(p).__name__}" for f, p in SAME_AS_GRAPH])
def test_one_run_of_blocks_decides_and_computes_as_the_whole_graph(family, policy):
    """Where all blocks form one run, blocks mode makes the same sites as whole-graph capture:
    the same decisions at every step and the same outputs."""
    model, inputs, _ = FAMILIES[family]()
    whole = adacache.compile(model, policy, capture="graph")
    blockwise = adacache.compile(model, policy, capture="blocks")
    expected = denoise(whole, moving(inputs), steps=6)
    got = denoise(blockwise, moving(inputs), steps=6)
    assert reuse_map(blockwise) == reuse_map(whole)
    assert any(reuse_map(blockwise)), "something is reused"
    for step, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"step {step}: {float((a - b).abs().max())}"
    sites = lambda m: [(s.label, s.role) for s in m.adacache.programs[0].layout.sites]  # noqa: E731
    assert sites(blockwise) == sites(whole)


# -- models whole-model export cannot capture ------------------------------------------------

class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.mod = nn.Linear(D, D)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.norm(h) * (1 + self.mod(c)[:, None])
        return h + self.mlp(self.attn(x, x, x)[0])


class Packing(nn.Module):
    """Keeps only the tokens some row's mask keeps (``int(mask.sum(1).max())``, as Lumina2
    packs captions): the blocks' token count depends on the mask's values, not its shape."""

    def __init__(self, depth: int = 3, residual_loop: bool = False) -> None:
        super().__init__()
        self.proj_in = nn.Linear(4, D)
        self.temb = nn.Sequential(nn.Linear(1, D), nn.SiLU(), nn.Linear(D, D))
        self.transformer_blocks = nn.ModuleList([Block() for _ in range(depth)])
        self.proj_out = nn.Linear(D, 4)
        self.residual_loop = residual_loop

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kept = int(mask.sum(1).max())  # torch.export cannot trace this
        h = self.proj_in(x[:, :kept])
        c = self.temb(timestep[:, None] / 1000)
        for block in self.transformer_blocks:
            h = h + 0.5 * block(h, c) if self.residual_loop else block(h, c)
        out = self.proj_out(h)
        return torch.cat([out, x[:, kept:]], dim=1)


def packing_inputs(kept: int = 6):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, generator=gen)
    mask = torch.zeros(2, 8)
    mask[:, :kept] = 1
    return lambda t: dict(x=x, timestep=t.expand(2), mask=mask)


def _seeded(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return model.eval()


class TwoStacks(nn.Module):
    """A dual-stack model with a concatenation between the stacks (AuraFlow, Flux.2): the
    concatenation reads the last block of the first stack, so the stacks are two runs."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(4, D)
        self.temb = nn.Sequential(nn.Linear(1, D), nn.SiLU(), nn.Linear(D, D))
        self.transformer_blocks = nn.ModuleList([Block(), Block()])
        self.single_transformer_blocks = nn.ModuleList([Block(), Block()])
        self.proj_out = nn.Linear(D, 4)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h, c = self.proj_in(x), self.temb(timestep[:, None] / 1000)
        for block in self.transformer_blocks:
            h = block(h, c)
        h = torch.cat([context, h], dim=1)
        for block in self.single_transformer_blocks:
            h = block(h, c)
        return self.proj_out(h[:, context.shape[1] :])


def test_two_runs_get_a_site_each_and_reuse_at_the_same_steps():
    model = _seeded(TwoStacks())
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 8, 4, generator=gen), torch.randn(2, 3, D, generator=gen)
    inputs = lambda t: dict(x=x, timestep=t.expand(2), context=context)  # noqa: E731
    whole = adacache.compile(model, adacache.FORA(interval=2), capture="graph")
    blockwise = adacache.compile(model, adacache.FORA(interval=2), capture="blocks")
    expected = denoise(whole, moving(inputs), steps=6)
    got = denoise(blockwise, moving(inputs), steps=6)
    program = blockwise.adacache.programs[0]
    assert [run.plan.describe() for run in program.runs] == ["transformer_blocks.0..transformer_blocks.1",
                                                             "single_transformer_blocks.0..single_transformer_blocks.1"]
    assert [s.name for s in program.layout.sites] == ["run0_site_0", "run1_site_0"]
    assert [s.label for s in whole.adacache.programs[0].layout.sites] == ["transformer_blocks.0..single_transformer_blocks.1"]
    assert reuse_map(blockwise) == reuse_map(whole) == [False, True] * 3
    for a, b in zip(got, expected):  # FORA reuses stale outputs: each run's is the span's part
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert [s.reused for s in adacache.summary(blockwise).sites] == [3, 3]


def test_graph_mode_fails_and_auto_falls_back_once_with_the_reason():
    model = _seeded(Packing())
    with pytest.raises(adacache.CaptureError, match="int\\(mask.sum\\(1\\).max\\(\\)\\)"):
        denoise(adacache.compile(model, adacache.FORA(interval=2), capture="graph"), packing_inputs())
    compiled = adacache.compile(model, adacache.FORA(interval=2))
    with pytest.warns(adacache.CaptureFallbackWarning, match="kept = int") as caught:
        got = denoise(compiled, moving(packing_inputs()), steps=6)
        denoise(compiled, moving(packing_inputs(kept=5)), steps=2)  # a new signature: no second attempt, no warning
    assert len([w for w in caught if issubclass(w.category, adacache.CaptureFallbackWarning)]) == 1
    expected = denoise(model, moving(packing_inputs()), steps=6)
    for step in (0, 2, 4):
        assert torch.equal(got[step], expected[step])
    assert "capture: blocks" in adacache.explain(compiled)

    with warnings.catch_warnings():
        warnings.simplefilter("error", adacache.CaptureFallbackWarning)  # asked for: no warning
        blocks = adacache.compile(model, adacache.FORA(interval=2), capture="blocks")
        assert [torch.equal(a, b) for a, b in zip(denoise(blocks, moving(packing_inputs()), steps=6), got)] == [True] * 6
    assert reuse_map(blocks) == [False, True] * 3


def test_a_run_whose_tokens_change_with_the_values_keeps_a_graph_per_shape_and_never_reuses_across():
    """The CFG pair as two calls whose masks keep different token counts: one input
    signature, two shapes inside. Each slot reuses its own cache, of its own shape."""
    model = _seeded(Packing())
    compiled = adacache.compile(model, adacache.FORA(interval=2), capture="blocks")
    cond, uncond = moving(packing_inputs(kept=6)), moving(packing_inputs(kept=4))
    new_request(compiled)
    outs = []
    with torch.no_grad():
        for t in torch.linspace(950, 50, 4):
            outs.append((compiled(**cond(t)), compiled(**uncond(t))))
    summary = adacache.summary(compiled)
    assert [any(r["reused"].values()) for r in summary.per_step] == [False, False, True, True] * 2
    assert summary.captures == 1 and summary.invalidations == 0
    (run,) = compiled.adacache.programs[0].runs
    assert len(run.graphs) == 2, "one graph per token count"
    with torch.no_grad():
        for step, t in enumerate(torch.linspace(950, 50, 4)):
            if step % 2 == 0:
                assert torch.equal(outs[step][0], model(**cond(t))) and torch.equal(outs[step][1], model(**uncond(t)))


def test_blocks_whose_outputs_the_model_reads_are_a_run_each():
    """``h = h + 0.5 * block(h, c)``: every block output is read by the model's own code, so no
    run can hold two blocks; each block is a run and a site of its own."""
    model = _seeded(Packing(residual_loop=True))
    compiled = adacache.compile(model, adacache.FORA(interval=2), capture="blocks")
    got = denoise(compiled, moving(packing_inputs()), steps=4)
    program = compiled.adacache.programs[0]
    assert [run.plan.describe() for run in program.runs] == [f"transformer_blocks.{i}" for i in range(3)]
    assert reuse_map(compiled) == [False, True, False, True]
    expected = denoise(model, moving(packing_inputs()), steps=4)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])


class ReadsShapes(Packing):
    """Reads the shape and dtype of each block output in its loop: metadata, not the value."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kept = int(mask.sum(1).max())
        h = self.proj_in(x[:, :kept])
        c = self.temb(timestep[:, None] / 1000)
        for block in self.transformer_blocks:
            h = block(h, c)
            assert h.shape[1] == kept and h.dtype == torch.float32 and h.dim() == 3 and h.size(0) == 2
        return self.proj_out(h)


def test_reading_a_block_outputs_shape_does_not_end_its_run():
    model = _seeded(ReadsShapes())
    compiled = adacache.compile(model, adacache.FORA(interval=2), capture="blocks")
    got = denoise(compiled, moving(packing_inputs()), steps=4)
    (run,) = compiled.adacache.programs[0].runs
    assert run.plan.describe() == "transformer_blocks.0..transformer_blocks.2"
    assert reuse_map(compiled) == [False, True, False, True]
    assert torch.equal(got[2], denoise(model, moving(packing_inputs()), steps=4)[2])


class ReadsAMiddleOutputLater(Packing):
    """Reads a block output only at late steps: the recorded call did not, so the run spans it."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kept = int(mask.sum(1).max())
        h = self.proj_in(x[:, :kept])
        c = self.temb(timestep[:, None] / 1000)
        first = self.transformer_blocks[0](h, c)
        extra = first.mean() if float(timestep[0]) < 500 else 0.0
        h = self.transformer_blocks[2](self.transformer_blocks[1](first, c), c)
        return self.proj_out(h) + extra


def test_a_model_that_reads_a_block_output_it_did_not_read_when_recorded_gets_a_capture_error():
    model = _seeded(ReadsAMiddleOutputLater())
    compiled = adacache.compile(model, adacache.FORA(interval=2), capture="blocks")
    with pytest.raises(adacache.CaptureError, match="transformer_blocks.0"):
        denoise(compiled, packing_inputs(), steps=4)


def test_blocks_mode_cannot_be_exported(tmp_path):
    model = _seeded(Packing())
    compiled = adacache.compile(model, adacache.FORA(interval=2), capture="blocks")
    inputs = packing_inputs()
    with pytest.raises(adacache.ExportError, match="capture='blocks'"):
        adacache.export(compiled, tmp_path / "artifact", example_inputs=((), inputs(torch.tensor(500.0))))


def test_unknown_capture_mode():
    with pytest.raises(ValueError, match="capture must be one of"):
        adacache.compile(_seeded(Packing()), adacache.FORA(), capture="modules")


def test_the_fallback_warning_points_at_the_callers_line():
    compiled = adacache.compile(_seeded(Packing()), adacache.NoCache())
    with pytest.warns(adacache.CaptureFallbackWarning) as caught, torch.no_grad():
        compiled(**packing_inputs()(torch.tensor(500.0)))
    assert caught[0].filename == __file__


def test_blocks_mode_with_inductor_equals_eager_and_never_recompiles():
    """The run's input is a transposed view (the patch embedding's); Inductor compiles the
    run's graph once and each later step reuses it."""
    import torch._dynamo.utils as dynamo_utils

    model, inputs, _ = FAMILIES["tiny_dit"]()
    eager = adacache.compile(model, adacache.FORA(interval=2), capture="blocks")
    compiled = adacache.compile(model, adacache.FORA(interval=2), capture="blocks", backend="inductor")
    expected = denoise(eager, moving(inputs), steps=4)
    denoise(compiled, moving(inputs), steps=4)  # the first generation compiles
    dynamo_utils.counters.clear()
    got = denoise(compiled, moving(inputs), steps=4)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)
    assert reuse_map(compiled)[-4:] == [False, True, False, True]
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 0, "nothing compiled after the first generation"


def test_recording_holds_no_block_output():
    """The recording follows block outputs by identity only while the model holds them: on a
    large model, keeping every block's activation would cost gigabytes."""
    import weakref

    from adacache.capture.blocks import record_block_runs

    model = _seeded(Packing(depth=4))
    outputs: list[weakref.ref] = []
    hooks = [block.register_forward_hook(lambda m, a, out: outputs.append(weakref.ref(out)))
             for block in model.transformer_blocks]
    recording = record_block_runs(model, (), packing_inputs()(torch.tensor(500.0)), [f"transformer_blocks.{i}" for i in range(4)])
    for hook in hooks:
        hook.remove()
    assert len(outputs) == 4 and all(ref() is None for ref in outputs)
    assert [run.describe() for run in recording.runs] == ["transformer_blocks.0..transformer_blocks.3"]
    assert [len(example) for example in recording.examples] == [2]


class WritesItsOwnBuffer(Packing):
    """Replaces a buffer at every call from its input, then reads it, as OmniGen's rotary
    embedding does with ``inv_freq``."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kept = int(mask.sum(1).max())
        self.register_buffer("scale", torch.full((1,), float(kept)), persistent=False)
        h = self.proj_in(x[:, :kept])
        c = self.temb(timestep[:, None] / 1000)
        for block in self.transformer_blocks:
            h = block(h, c)
        return self.proj_out(h) * self.scale


def test_two_threads_in_blocks_mode_each_read_their_own_writes():
    """Thread A writes its buffer and is held before reading it while thread B writes another
    value: each thread's code runs on its own copy of the model, so A reads its own value."""
    import threading

    a_waiting, b_done, holding = threading.Event(), threading.Event(), threading.local()

    def hold_a(module, args):
        if getattr(holding, "a", False):
            a_waiting.set()
            assert b_done.wait(10)
        elif getattr(holding, "b", False):
            b_done.set()

    model = _seeded(WritesItsOwnBuffer())
    model.proj_out.register_forward_pre_hook(hold_a)  # before compiling: a new hook is a changed model
    compiled = adacache.compile(model, adacache.FORA(interval=2), capture="blocks")
    masks = {"a": packing_inputs(kept=6), "b": packing_inputs(kept=3)}
    t = torch.tensor(900.0)
    with torch.no_grad():
        expected = {k: model(**inputs(t)) for k, inputs in masks.items()}
        for inputs in masks.values():  # capture both shapes of the run before the threads start
            new_request(compiled)
            compiled(**inputs(t))
    got: dict[str, object] = {}

    def request(name: str) -> None:
        setattr(holding, name, True)
        if name == "b":
            assert a_waiting.wait(10)
        try:
            with torch.no_grad():
                new_request(compiled)
                got[name] = compiled(**masks[name](t))
        except Exception as exc:  # noqa: BLE001 - reported below
            got[name] = exc

    threads = [threading.Thread(target=request, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert all(isinstance(got[k], torch.Tensor) and torch.equal(got[k], expected[k]) for k in masks), got
