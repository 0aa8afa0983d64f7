"""The anchor adapters really run the anchors, and leave the model exactly as they found it.

A tiny ``DiTTransformer2DModel`` with random non-zero weights (adaLN-Zero's zero init would make
every block the identity, so no cache could be told from full computation) is sampled with a
trivial CFG loop.  For every configuration of the quick sweep: outputs are finite and shaped
like the model's, the anchor attaches to the model, generations are reproducible (state is
reset), and ``remove()`` restores the original computation bit for bit.  A loose setting of
each method must skip work and change the output, so an anchor that is silently inert (the
failure that would make it look worse than it is) fails here.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("cache_dit")

from adacache.bench import anchors as A  # noqa: E402

STEPS = 8
LAYERS = 4
NULL = 1000  # num_embeds_ada_norm: DiT's null-class row

QUICK = A.anchor_sweeps(quick=True, num_inference_steps=STEPS)

# Settings loose enough that every anchor must reuse something within 8 steps on the tiny
# random model (whose features change a lot between steps).
LOOSE: dict[str, dict[str, Any]] = {
    "FirstBlockCache": {"threshold": 10.0},
    "TaylorSeer": {"interval": 2, "warmup": 2},
    "MagCache": {"threshold": 10.0, "retention_ratio": 0.1},
    "PyramidAttentionBroadcast": {"interval": 2, "timestep_range": [-1, 1000]},
    "FasterCache": {"uncond_interval": 2},
    "SeaCache": {"threshold": 100.0},
    # cache-dit's TaylorSeer state is created at the first full step and misses that step's
    # counter tick, so it only extrapolates after 4 computed steps: warm up 4.
    "DBCache": {"threshold": 10.0, "warmup": 4},
    "DBCache+TaylorSeer": {"threshold": 10.0, "warmup": 4},
}


def _ids(config: A.AnchorConfig) -> str:
    return config.label()


def _tiny_dit() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=LAYERS,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=NULL,
        norm_type="ada_norm_zero",
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def _generate(denoiser: Any, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A stand-in sampler with the benchmark's contract: [cond; uncond], decreasing timesteps."""
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    labels = torch.cat([torch.arange(batch) + 3, torch.full((batch,), NULL)])
    with torch.no_grad():
        for t in torch.linspace(999, 0, STEPS).round().long():
            out = denoiser(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * batch), class_labels=labels).sample
            assert out.shape == (2 * batch, 8, 8, 8)
            cond, uncond = out[:, :4].chunk(2)
            x = x - 0.1 * (uncond + 4.0 * (cond - uncond))
    return x


def _instance_state(model: torch.nn.Module) -> list[tuple[str, list[str], list[str]]]:
    return [(name, sorted(vars(m)), list(m._modules)) for name, m in model.named_modules()]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    # One model object for the whole file: anchors follow one another on it, as in the benchmark.
    return _tiny_dit()


@pytest.fixture(scope="module")
def reference(model: torch.nn.Module) -> torch.Tensor:
    return _generate(model)


def _restored(model: torch.nn.Module, reference: torch.Tensor, state: list[Any]) -> None:
    assert _instance_state(model) == state, "remove() left attributes or changed the module order"
    assert all("_diffusers_hook" not in vars(m) for m in model.modules())
    assert torch.equal(_generate(model), reference), "remove() did not restore the original computation"


def test_sweeps_cover_every_method_with_unique_serialisable_labels() -> None:
    quick = A.anchor_sweeps(quick=True)
    full = A.anchor_sweeps()
    methods = {(s, m) for s, ms in A.supported_anchors().items() for m in ms}
    assert {(c.system, c.method) for c in quick} == methods
    assert {(c.system, c.method) for c in full} == methods
    for sweep in (quick, full):
        per_method: dict[tuple[str, str], int] = {}
        for c in sweep:
            per_method[(c.system, c.method)] = per_method.get((c.system, c.method), 0) + 1
            json.dumps(c.params)
        assert len({c.label() for c in sweep}) == len(sweep)
    assert all(1 <= n <= 2 for n in {k: sum(1 for c in quick if (c.system, c.method) == k) for k in methods}.values())
    assert all(sum(1 for c in full if (c.system, c.method) == k) >= 3 for k in methods)
    fbc = A.AnchorConfig("diffusers", "FirstBlockCache", {"threshold": 0.1})
    assert fbc.label() == "diffusers FirstBlockCache(threshold=0.1)"
    assert hash(fbc) == hash(A.AnchorConfig("diffusers", "FirstBlockCache", {"threshold": 0.1}))


@pytest.mark.parametrize("config", QUICK, ids=_ids)
def test_quick_config_runs_and_remove_restores(model: torch.nn.Module, reference: torch.Tensor, config: A.AnchorConfig) -> None:
    before = _instance_state(model)
    run = A.apply_anchor(model, config)
    try:
        stats = run.stats()
        assert stats["anchor_modules"] >= LAYERS, "the anchor attached to (almost) nothing"
        outs = []
        for _ in range(2):
            run.new_generation()
            outs.append(_generate(run.denoiser))
            stats = run.stats()
            assert stats["calls"] == STEPS and stats["units"] == 2 * LAYERS * STEPS
            assert 0.0 <= stats["hit_rate"] <= 1.0 and stats["flop_bound"] >= 1.0
            json.dumps(stats)
        assert torch.isfinite(outs[0]).all()
        # new_generation() resets the anchor: the same seeds give the same samples again.
        assert torch.equal(outs[0], outs[1])
    finally:
        run.remove()
    _restored(model, reference, before)


@pytest.mark.parametrize("config", QUICK, ids=_ids)
def test_loose_setting_really_skips(model: torch.nn.Module, reference: torch.Tensor, config: A.AnchorConfig) -> None:
    before = _instance_state(model)
    loose = config.with_params(**LOOSE[config.method])
    run = A.apply_anchor(model, loose)
    try:
        run.new_generation()
        out = _generate(run.denoiser)
        stats = run.stats()
    finally:
        run.remove()
    assert torch.isfinite(out).all()
    assert stats["skipped"] > 0 and stats["flops_skipped"] > 0.05, stats
    assert not torch.allclose(out, reference), "reuse changed nothing: the anchor is not engaged"
    if config.system == "cache-dit":
        assert stats["anchor"]["cached_steps"] > 0
    _restored(model, reference, before)


def test_taylorseer_hooks_every_attention_and_feed_forward(model: torch.nn.Module) -> None:
    run = A.apply_anchor(model, A.AnchorConfig("diffusers", "TaylorSeer", {"interval": 3, "order": 1}))
    try:
        hooked = {name for name, _ in run._backend._hooked(model)}
    finally:
        run.remove()
    expected = {f"transformer_blocks.{i}.{part}" for i in range(LAYERS) for part in ("attn1", "ff")}
    assert hooked == expected
    assert "attn1" in (run.stats()["workaround"] or "")


def test_cache_dit_taylorseer_calibrator_changes_the_reuse(model: torch.nn.Module, reference: torch.Tensor) -> None:
    outs = {}
    for method in ("DBCache", "DBCache+TaylorSeer"):
        config = A.AnchorConfig("cache-dit", method, {"Fn": 1, "Bn": 0, "num_inference_steps": STEPS, **LOOSE[method]})
        run = A.apply_anchor(model, config)
        try:
            run.new_generation()
            outs[method] = _generate(run.denoiser)
            assert run.stats()["anchor"]["cached_steps"] > 0
        finally:
            run.remove()
    # Same cached steps, but TaylorSeer extrapolates the cached residual instead of reusing it.
    assert not torch.allclose(outs["DBCache"], outs["DBCache+TaylorSeer"])


def test_faster_cache_reorders_cfg_halves_exactly(model: torch.nn.Module) -> None:
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = {"hidden_states": x, "timestep": torch.full((4,), 999), "class_labels": torch.tensor([3, 5, NULL, NULL])}
    with torch.no_grad():
        expected = model(**kwargs).sample
    run = A.apply_anchor(model, A.AnchorConfig("diffusers", "FasterCache", {"attention_interval": 2, "uncond_interval": 2}))
    try:
        run.new_generation()
        with torch.no_grad():
            first = run.denoiser(**kwargs).sample  # iteration 0 computes everything
        # Swapping the halves in and back out returns the rows where they belong.
        torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
        assert "uncond" in (run.stats()["workaround"] or "")
        with pytest.raises(RuntimeError, match="classifier-free-guidance batch"):
            run.denoiser(hidden_states=x, timestep=torch.full((4,), 500), class_labels=torch.tensor([1, 2, 3, 4]))
    finally:
        run.remove()


def test_mag_cache_calibrates_on_the_model(model: torch.nn.Module) -> None:
    config = A.AnchorConfig("diffusers", "MagCache", {"threshold": 0.06, "num_inference_steps": STEPS})
    seen: list[int] = []

    def calibration(denoiser: Any) -> None:
        _generate(lambda **kw: (seen.append(1), denoiser(**kw))[1])

    run = A.apply_anchor(model, config, calibration=calibration)
    try:
        ratios = run.stats()["anchor"]["mag_ratios"]
        assert run.stats()["anchor"]["calibrated_by"] == "caller's sampler"
    finally:
        run.remove()
    assert len(seen) == STEPS and len(ratios) == STEPS and ratios[0] == 1.0
    assert any(abs(r - 1.0) > 1e-3 for r in ratios[1:])


def test_generation_without_new_generation_is_detected(model: torch.nn.Module) -> None:
    run = A.apply_anchor(model, A.AnchorConfig("diffusers", "FirstBlockCache", {"threshold": 10.0}))
    try:
        run.new_generation()
        first = _generate(run.denoiser)
        second = _generate(run.denoiser)  # timesteps rise again: a new generation
        assert run.stats()["auto_resets"] == 1
    finally:
        run.remove()
    assert torch.equal(first, second)


def test_unavailable_anchors_raise_with_a_reason(model: torch.nn.Module, reference: torch.Tensor) -> None:
    before = _instance_state(model)
    with pytest.raises(A.AnchorUnavailable, match="text"):
        A.apply_anchor(model, A.AnchorConfig("diffusers", "TextKVCache", {}))
    with pytest.raises(A.AnchorUnavailable, match="unknown anchor system"):
        A.apply_anchor(model, A.AnchorConfig("xdit", "DBCache", {}))
    with pytest.raises(A.AnchorUnavailable, match="leave none"):
        A.apply_anchor(model, A.AnchorConfig("cache-dit", "DBCache", {"Fn": 3, "Bn": 1}))
    with pytest.raises(A.AnchorUnavailable, match="transformer_blocks"):
        A.apply_anchor(torch.nn.Linear(2, 2), A.AnchorConfig("diffusers", "FirstBlockCache", {}))
    _restored(model, reference, before)


def test_instrumentation_can_be_switched_off(model: torch.nn.Module, reference: torch.Tensor) -> None:
    before = _instance_state(model)
    run = A.apply_anchor(model, A.AnchorConfig("diffusers", "PyramidAttentionBroadcast", {"interval": 2}), instrument=False)
    try:
        run.new_generation()
        out = _generate(run.denoiser)
        stats = run.stats()
        assert stats["instrumented"] is False and stats["hit_rate"] is None and stats["calls"] == STEPS
        run.set_instrumentation(True)
        run.new_generation()
        assert torch.equal(_generate(run.denoiser), out)
        assert run.stats()["hit_rate"] > 0
    finally:
        run.remove()
    with pytest.raises(RuntimeError, match="removed"):
        run.denoiser(hidden_states=torch.zeros(2, 4, 8, 8), timestep=torch.tensor([1, 1]), class_labels=torch.tensor([0, NULL]))
    _restored(model, reference, before)
