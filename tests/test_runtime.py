"""The runtime end to end: equivalence, reference loops, skipped work, CFG, shapes, threads."""

from __future__ import annotations

import threading

import pytest
import torch

import adacache
from adacache.models.dit import modulate, timestep_embedding
from families import FAMILIES
from helpers import run_against_reference, denoise, output_tensor

TIMESTEPS = torch.linspace(950, 50, 8)


def tiny():
    return FAMILIES["tiny_dit"]()


@pytest.mark.parametrize("name", ["tiny_dit", "diffusers_dit", "flux"])
def test_nocache_equals_the_original_model(name):
    model, inputs, _ = FAMILIES[name]()
    reference = denoise(model, inputs)
    cached = adacache.compile(model, adacache.NoCache())
    got = denoise(cached, inputs)
    for ref, out in zip(reference, got):
        assert torch.allclose(ref, out, atol=1e-6, rtol=0)


def test_nocache_is_bitwise_in_float64():
    model, inputs, _ = tiny()
    model = model.double()

    def inputs64(t):
        kw = inputs(t)
        kw["x"] = kw["x"].double()
        return kw

    reference = denoise(model, inputs64)
    got = denoise(adacache.compile(model, adacache.NoCache()), inputs64)
    assert all(torch.equal(a, b) for a, b in zip(reference, got))


def _final(model, h, c):
    shift, scale = model.final_modulation(c).chunk(2, dim=1)
    return model.unpatchify(model.final_linear(modulate(model.final_norm(h), shift, scale)))


def _embed(model, kw):
    h = model.x_embedder(kw["x"]).flatten(2).transpose(1, 2) + model.pos_embed
    c = model.t_embedder(timestep_embedding(kw["timestep"], 256).to(h.dtype)) + model.y_embedder(kw["class_labels"])
    return h, c


def reference_fora(model, inputs, interval, reuse_form="residual"):
    """FORA written out by hand: every block reused for interval-1 of interval steps, as its
    residual added to the current input, or as its stale output."""
    cache: dict[int, torch.Tensor] = {}
    outs = []
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            h, c = _embed(model, inputs(t))
            reuse = step % interval != 0
            for i, block in enumerate(model.blocks):
                if reuse:
                    h = h + cache[i] if reuse_form == "residual" else cache[i]
                else:
                    out = block(h, c)
                    cache[i] = out - h if reuse_form == "residual" else out
                    h = out
            outs.append(_final(model, h, c))
    return outs


def reference_first_block_cache(model, inputs, threshold):
    """FBCache by hand: block 0 probes; if its residual moved less than threshold (relative
    L1, every batch item) since the last full step, the rest is reused."""
    probe_cache = rest_cache = None
    outs, reused = [], []
    with torch.no_grad():
        for t in TIMESTEPS:
            h, c = _embed(model, inputs(t))
            out0 = model.blocks[0](h, c)
            r0 = out0 - out0.new_zeros(()) - h
            use = False
            if probe_cache is not None:
                score = [(r0[b] - probe_cache[b]).abs().mean() / probe_cache[b].abs().mean() for b in range(r0.shape[0])]
                use = all(s < threshold for s in score)
            h = out0
            if use:
                h = h + rest_cache
            else:
                start = h
                for block in model.blocks[1:]:
                    h = block(h, c)
                rest_cache = h - start
                probe_cache = r0
            reused.append(use)
            outs.append(_final(model, h, c))
    return outs, reused


@pytest.mark.parametrize("reuse_form", ["residual", "output"])
def test_fora_matches_hand_written_loop_and_skips_blocks(reuse_form):
    model, inputs, n_blocks = tiny()
    expected = reference_fora(model, inputs, interval=3, reuse_form=reuse_form)
    # Capture up front: tracing runs the model on fake tensors, which the counter would see.
    cached = adacache.compile(model, adacache.FORA(interval=3, reuse=reuse_form), example_inputs=((), inputs(TIMESTEPS[0])))
    executed = run_against_reference(cached, inputs, TIMESTEPS, expected)
    # Attention runs once per computed block: all blocks at steps 0, 3, 6; none in between.
    assert executed == [n_blocks if s % 3 == 0 else 0 for s in range(len(TIMESTEPS))]
    summary = adacache.summary(cached)
    assert summary.hit_rate == pytest.approx(5 / 8)
    assert 0.55 < summary.flops_skipped < 5 / 8


@pytest.mark.parametrize("threshold", [0.05, 0.5, 1.5])
def test_first_block_cache_matches_hand_written_loop(threshold):
    model, inputs, n_blocks = tiny()
    expected, reused = reference_first_block_cache(model, inputs, threshold)
    cached = adacache.compile(model, adacache.FirstBlockCache(threshold))
    got = denoise(cached, inputs)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"step {step}"
    flags = [rec["reused"]["site_1"] for rec in adacache.summary(cached).per_step]
    assert flags == reused
    if threshold == 1.5:
        assert sum(reused) >= 3, "a loose threshold must reuse"


def test_reuse_changes_the_output_so_tests_can_tell():
    model, inputs, _ = tiny()
    exact = denoise(model, inputs)
    approx = denoise(adacache.compile(model, adacache.FORA(interval=3)), inputs)
    assert not torch.allclose(exact[1], approx[1], atol=1e-4)
    assert torch.equal(exact[0], approx[0])


def test_cfg_as_two_calls_per_step_keeps_a_cache_per_slot():
    model, inputs, _ = tiny()

    def cond_inputs(t):
        kw = inputs(t)
        return dict(kw, x=kw["x"][:1], timestep=kw["timestep"][:1], class_labels=kw["class_labels"][:1])

    def uncond_inputs(t):
        kw = inputs(t)
        return dict(kw, x=kw["x"][1:] * 0.5, timestep=kw["timestep"][1:], class_labels=kw["class_labels"][1:])

    alone_c = denoise(adacache.compile(model, adacache.FORA(interval=2)), cond_inputs)
    alone_u = denoise(adacache.compile(model, adacache.FORA(interval=2)), uncond_inputs)
    paired = adacache.compile(model, adacache.FORA(interval=2))
    paired.adacache.new_request()
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            c = paired(**cond_inputs(t))
            u = paired(**uncond_inputs(t))
            assert torch.allclose(c, alone_c[step], atol=1e-6)
            assert torch.allclose(u, alone_u[step], atol=1e-6)
    slots = [(r["step"], r["slot"]) for r in adacache.summary(paired).per_step]
    assert slots == [(s, k) for s in range(len(TIMESTEPS)) for k in (0, 1)]


def test_timestep_going_back_up_starts_a_new_generation():
    model, inputs, _ = tiny()
    cached = adacache.compile(model, adacache.FORA(interval=4))
    first = denoise(cached, inputs)
    second = denoise(cached, inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "the second generation must not see the first's cache"
    assert adacache.summary(cached).generations == 2


def test_batch_size_change_mid_generation_recomputes_instead_of_failing():
    model, inputs, _ = tiny()
    cached = adacache.compile(model, adacache.FORA(interval=4))
    cached.adacache.new_request()
    with torch.no_grad():
        cached(**inputs(TIMESTEPS[0]))
        kw = inputs(TIMESTEPS[1])
        small = dict(x=kw["x"][:1], timestep=kw["timestep"][:1], class_labels=kw["class_labels"][:1])
        out = cached(**small)  # step 1 would reuse, but the cache has the wrong batch size
        expected = model(**small)
    assert torch.equal(out, expected), "an invalidated cache means a full computation"
    summary = adacache.summary(cached)
    assert summary.invalidations == 1 and summary.captures == 2


def test_resolution_change_between_generations_recaptures():
    model, inputs, _ = FAMILIES["pixart"]()
    cached = adacache.compile(model, adacache.FORA(interval=2))
    denoise(cached, inputs, steps=3)

    def larger(t):
        return dict(inputs(t), hidden_states=torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)))

    expected = denoise(model, larger, steps=3)
    got = denoise(cached, larger, steps=3)
    assert got[0].shape == (2, 8, 16, 16)
    assert torch.allclose(got[0], expected[0], atol=1e-6), "a new resolution starts with a full step"
    assert len(cached.adacache.programs) == 2


def test_nan_cache_is_never_reused_and_is_counted():
    model, inputs, _ = tiny()
    cached = adacache.compile(model, adacache.FORA(interval=2))

    def poisoned(t):
        kw = inputs(t)
        if float(t) == float(TIMESTEPS[0]):
            kw = dict(kw, x=torch.full_like(kw["x"], float("nan")))
        return kw

    with torch.no_grad():
        for t in TIMESTEPS[:2]:
            out = cached(**poisoned(t))
        expected = model(**inputs(TIMESTEPS[1]))
    assert torch.isfinite(out).all(), "step 1 must recompute instead of reusing the NaN cache"
    assert torch.allclose(out, expected, atol=1e-6)
    summary = adacache.summary(cached)
    assert summary.nonfinite >= 1
    assert summary.per_step[1]["reused"] == {"site_0": False}


def test_concurrent_requests_do_not_mix_caches():
    model, inputs, _ = tiny()

    def other(t):
        kw = inputs(t)
        return dict(kw, x=-kw["x"], class_labels=torch.tensor([7, 10]))

    cached = adacache.compile(model, adacache.FORA(interval=3))
    expected = {"a": denoise(cached, inputs), "b": denoise(cached, other)}
    results: dict[str, list[torch.Tensor]] = {}
    barrier = threading.Barrier(2)

    def worker(key, fn):
        barrier.wait()
        cached.adacache.new_request()  # this thread's own session
        outs = []
        with torch.no_grad():
            for t in TIMESTEPS:
                outs.append(cached(**fn(t)).clone())
        results[key] = outs

    threads = [threading.Thread(target=worker, args=("a", inputs)), threading.Thread(target=worker, args=("b", other))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for key in ("a", "b"):
        assert all(torch.equal(x, y) for x, y in zip(results[key], expected[key]))


def test_explicit_session_isolates_and_reset_restarts():
    model, inputs, _ = tiny()
    cached = adacache.compile(model, adacache.FORA(interval=2))
    with torch.no_grad():
        cached(**inputs(TIMESTEPS[0]))
        with adacache.session(cached) as sess:
            out = cached(**inputs(TIMESTEPS[1]))
            assert sess.step == 0, "a fresh session starts at step 0"
        assert torch.equal(out, model(**inputs(TIMESTEPS[1])))
        cached.adacache.reset()
        assert cached.adacache.current_session().step == -1


def test_session_used_from_another_thread_is_refused():
    model, inputs, _ = tiny()
    cached = adacache.compile(model, adacache.FORA(interval=2))
    sess = cached.adacache.current_session()
    errors = []

    def worker():
        try:
            sess.call((), inputs(TIMESTEPS[0]))
        except adacache.SessionError as exc:
            errors.append(exc)

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    assert errors and "another thread" in str(errors[0])


def test_output_types_are_preserved():
    model, inputs, _ = FAMILIES["diffusers_dit"]()
    cached = adacache.compile(model, adacache.FORA(interval=2))
    with torch.no_grad():
        out = cached(**inputs(TIMESTEPS[0]))
        tup = cached(**inputs(TIMESTEPS[1]), return_dict=False)
    assert type(out).__name__ == "Transformer2DModelOutput" and isinstance(out.sample, torch.Tensor)
    assert isinstance(tup, tuple) and len(tup) == 1
    assert cached.config.num_layers == 3, "attributes of the wrapped model stay reachable"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_run(dtype):
    model, inputs, _ = tiny()
    model = model.to(dtype)

    def typed(t):
        kw = inputs(t)
        return dict(kw, x=kw["x"].to(dtype))

    reference = denoise(model, typed, steps=3)
    got = denoise(adacache.compile(model, adacache.NoCache()), typed, steps=3)
    assert got[0].dtype == dtype
    assert all(torch.equal(a, b) for a, b in zip(reference, got))


def test_summary_reports_hits_flops_and_memory():
    model, inputs, _ = tiny()
    cached = adacache.compile(model, adacache.FORA(interval=2))
    denoise(cached, inputs)
    summary = adacache.summary(cached)
    assert summary.hit_rate == pytest.approx(0.5)
    assert summary.cache_bytes == 2 * 16 * 64 * 4 + 1, "one span: the last block's output and a validity flag"
    text = str(summary)
    assert "hit rate 50.0%" in text and "blocks.0..3" in text
    assert output_tensor(torch.zeros(1)).shape == (1,)
    with torch.inference_mode():  # FLOP counting must not need autograd
        fresh = adacache.compile(model, adacache.FORA(interval=2))
        denoise(fresh, inputs)
        assert adacache.summary(fresh).flops_skipped == pytest.approx(summary.flops_skipped)


def test_nocache_outlines_every_block_and_keeps_no_state():
    model, inputs, n_blocks = tiny()
    cached = adacache.compile(model, adacache.NoCache(), example_inputs=((), inputs(TIMESTEPS[0])))
    program = cached.adacache.programs[0]
    assert program.layout.states == [] and program.layout.controls == []
    assert [line for line in adacache.graph_structure(program.portable) if line.startswith("call ")] == [
        f"call site_{i}" for i in range(n_blocks)
    ]
    denoise(cached, inputs)
    summary = adacache.summary(cached)
    assert summary.hit_rate == 0.0 and summary.cache_bytes == 0 and summary.sites[0].calls == len(TIMESTEPS)


class _NonzeroModel(torch.nn.Module):
    """Calls ``nonzero`` in its forward: its FLOPs cannot be counted on fake tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        active = torch.nonzero(x[0] > 0).numel()
        for block in self.blocks:
            x = block(x)
        return x * active + timestep.view(-1, 1)


def test_summary_of_a_model_with_data_dependent_ops_reports_flops_unknown():
    compiled = adacache.compile(_NonzeroModel().eval(), adacache.FirstBlockCache(2.0))
    compiled.adacache.new_request()
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0):
            compiled(torch.randn(2, 8), torch.full((2,), t))
    summary = adacache.summary(compiled)
    assert summary.flops_skipped is None and summary.flop_bound_speedup is None
    assert "FLOPs unknown" in str(summary) and summary.calls == 3
