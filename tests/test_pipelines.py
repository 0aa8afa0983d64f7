"""Real diffusers pipelines through ``adacache.compile(pipe, ...)``, as users drive them.

(The family matrix is tests/test_pipeline_families.py.) Back-to-back requests that differ (steps, resolution, batch, guidance,
txt2img -> img2img) each equal the same request alone; diffusers' LoRA and processor APIs
act on the compiled denoiser; threads; undoing; saving. The known bugs of other caching
systems are named tests at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

import adacache  # noqa: E402
from pipelines import PIPELINES, TinyPipeline, run, shared  # noqa: E402

def compiled(tp: TinyPipeline, policy: adacache.Policy) -> TinyPipeline:
    return dataclasses.replace(tp, pipe=adacache.compile(tp.pipe, policy))


# -- back-to-back requests ---------------------------------------------------------------

REQUEST_CHANGES = {
    "flux": [dict(num_inference_steps=2), dict(num_inference_steps=1), dict(height=32, width=32),
             dict(num_images_per_prompt=2), dict(num_inference_steps=5), {}],
    "sd3": [dict(guidance_scale=1.0), dict(num_inference_steps=3), dict(num_images_per_prompt=2),
            dict(height=32, width=32), dict(num_inference_steps=1), {}],
}


@pytest.mark.parametrize("family", sorted(REQUEST_CHANGES))
def test_back_to_back_requests_each_equal_the_request_alone(family):
    # cache-dit #540 (stale state between requests with different step counts) is one of these.
    tp = shared(family)
    policy = adacache.TaylorSeer(order=1, interval=2)
    one_model = compiled(tp, policy)
    for change in REQUEST_CHANGES[family]:
        alone = run(compiled(tp, policy), **change)
        assert torch.equal(run(one_model, **change), alone), change
    assert adacache.summary(one_model.pipe).generations == 1, "summary tells the latest request"


def test_interrupted_txt2img_then_img2img_equals_img2img_alone():
    from diffusers import FluxImg2ImgPipeline

    tp = shared("flux")
    policy = adacache.TaylorSeer(order=1, interval=2)
    txt2img = adacache.compile(tp.pipe, policy)
    # diffusers' from_pipe matches component types exactly, so the compiled transformer is passed by name.
    img2img = adacache.compile(FluxImg2ImgPipeline.from_pipe(txt2img, transformer=txt2img.transformer), policy)
    assert img2img.transformer is txt2img.transformer, "the compiled transformer and its captures are shared"
    call = dict(tp.call, image=torch.linspace(0, 1, 3 * 16 * 16).reshape(1, 3, 16, 16), strength=0.75)

    def interrupt(pipe, step, timestep, kwargs):
        pipe._interrupt = True
        return kwargs

    alone = run(dataclasses.replace(tp, pipe=adacache.compile(FluxImg2ImgPipeline.from_pipe(tp.pipe), policy), call=call))
    run(dataclasses.replace(tp, pipe=txt2img), callback_on_step_end=interrupt)
    after = run(dataclasses.replace(tp, pipe=img2img, call=call))
    assert torch.equal(after, alone)


def test_plain_pipeline_with_a_compiled_transformer_warns_once_and_still_runs():
    tp = shared("flux")
    pipe = copy.copy(tp.pipe)
    pipe.transformer = adacache.compile(tp.pipe.transformer, adacache.NoCache())
    with pytest.warns(adacache.RequestBoundaryWarning, match="adacache.compile\\(pipe, policy\\)"):
        first = run(dataclasses.replace(tp, pipe=pipe))
    with warnings.catch_warnings():
        warnings.simplefilter("error", adacache.RequestBoundaryWarning)
        run(dataclasses.replace(tp, pipe=pipe), seed=1)
    assert torch.allclose(first, run(tp), rtol=1e-5, atol=1e-6)
    # Compiling that pipeline keeps the compiled transformer (same policy) and needs no warning.
    whole = adacache.compile(pipe, adacache.NoCache())
    assert whole.transformer is pipe.transformer
    with pytest.raises(TypeError, match="already compiled"):
        adacache.compile(pipe, adacache.FORA(interval=2))


def test_heun_scheduler_second_calls_are_slots_of_the_same_step():
    from diffusers import FlowMatchHeunDiscreteScheduler

    tp = shared("sd3")
    heun = dataclasses.replace(tp, pipe=copy.copy(tp.pipe))
    heun.pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(tp.pipe.scheduler.config)
    cached = compiled(heun, adacache.FORA(interval=2))
    run(cached)
    per_step = adacache.summary(cached.pipe).per_step
    steps = tp.call["num_inference_steps"]
    assert [r["step"] for r in per_step][:3] == [0, 1, 1], "Heun repeats each timestep after the first: a second slot"
    assert max(r["step"] for r in per_step) == steps - 1
    assert {r["slot"] for r in per_step} == {0, 1}


def test_wan22_compiles_both_experts_and_each_sees_its_own_steps():
    tp = shared("wan22")
    cached = compiled(tp, adacache.FORA(interval=2))
    assert isinstance(cached.pipe.transformer, adacache.CachedModule)
    assert isinstance(cached.pipe.transformer_2, adacache.CachedModule)
    assert cached.pipe.transformer.adacache is not cached.pipe.transformer_2.adacache
    run(cached)
    high = cached.pipe.transformer.adacache.latest_session().stats
    low = cached.pipe.transformer_2.adacache.latest_session().stats
    assert high.calls > 0 and low.calls > 0, "both experts ran, each in its own request"
    assert adacache.summary(cached.pipe, denoiser="transformer_2").calls == low.calls
    assert adacache.summary(cached.pipe).calls == high.calls
    with pytest.raises(ValueError, match="transformer_3"):
        adacache.summary(cached.pipe, denoiser="transformer_3")


# -- diffusers' own machinery on a compiled denoiser -------------------------------------

def _lora_state_dict(transformer: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA for ``transformer`` (as ``save_lora_weights`` would write it)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = copy.deepcopy(adacache.uncompile(transformer) if isinstance(transformer, adacache.CachedModule) else transformer)
    torch.manual_seed(seed)
    donor.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    return {f"transformer.{k}": v for k, v in get_peft_model_state_dict(donor).items()}


def _fresh_flux_pair():
    tp = PIPELINES["flux"]()
    plain = dataclasses.replace(tp, pipe=PIPELINES["flux"]().pipe)  # same weights, separate objects
    return tp, plain


@pytest.mark.parametrize("policy", [adacache.NoCache(), adacache.FORA(interval=2)], ids=lambda p: type(p).__name__)
def test_pipeline_lora_calls_act_on_the_compiled_transformer(policy):
    pytest.importorskip("peft")
    tp, plain = _fresh_flux_pair()
    lora_a, lora_b = _lora_state_dict(tp.pipe.transformer, 1), _lora_state_dict(tp.pipe.transformer, 2)
    tp.pipe.load_lora_weights(lora_a, adapter_name="a")  # before compiling
    plain.pipe.load_lora_weights(lora_a, adapter_name="a")
    cached = compiled(tp, policy)
    reference = compiled(plain, policy) if not isinstance(policy, adacache.NoCache) else plain

    def same(what: str) -> None:
        # A fresh compile of the plain twin after the same change is the oracle for caching policies.
        oracle = compiled(dataclasses.replace(plain, pipe=adacache.uncompile(reference.pipe)), policy) \
            if not isinstance(policy, adacache.NoCache) else plain
        got, want = run(cached), run(oracle)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), f"{what}: {float((got - want).abs().max())}"

    before = run(cached)
    same("loaded before compile")
    changes = [
        ("loaded after compile", lambda pipe: pipe.load_lora_weights(lora_b, adapter_name="b")),
        ("set_adapters with weights", lambda pipe: pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.5])),
        ("set_adapters(['b'])", lambda pipe: pipe.set_adapters(["b"])),
        ("disable_lora", lambda pipe: pipe.disable_lora()),
        ("enable_lora", lambda pipe: pipe.enable_lora()),
        ("fuse_lora", lambda pipe: pipe.fuse_lora()),
        ("unfuse_lora", lambda pipe: pipe.unfuse_lora()),
        ("delete_adapters", lambda pipe: pipe.delete_adapters("a")),
        ("unload_lora_weights", lambda pipe: pipe.unload_lora_weights()),
    ]
    for what, change in changes:
        change(cached.pipe)  # the same diffusers call on the compiled pipeline and on its plain twin
        change(plain.pipe)
        same(what)
        if what == "loaded after compile":
            assert not torch.equal(run(cached), before)
    assert cached.pipe.transformer.adacache.recaptures, "each change was followed by capturing again"


def test_lora_loaded_after_caching_is_enabled():
    """ComfyUI-TeaCache #163: a LoRA loaded after caching was enabled was ignored."""
    pytest.importorskip("peft")
    tp, plain = _fresh_flux_pair()
    policy = adacache.FORA(interval=2)
    cached = compiled(tp, policy)
    run(cached)
    lora = _lora_state_dict(tp.pipe.transformer, 3)
    cached.pipe.load_lora_weights(lora, adapter_name="late")
    plain.pipe.load_lora_weights(lora, adapter_name="late")
    assert torch.equal(run(cached), run(compiled(plain, policy)))


class _Doubled:
    """A custom attention processor wrapping the model's own: outputs doubled."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return tuple(o * 2 for o in out) if isinstance(out, tuple) else out * 2


def test_attention_processor_set_on_the_pipeline_after_compile():
    tp, plain = _fresh_flux_pair()
    cached = compiled(tp, adacache.NoCache())
    before = run(cached)
    for transformer in (cached.pipe.transformer, plain.pipe.transformer):
        transformer.set_attn_processor({name: _Doubled(p) for name, p in transformer.attn_processors.items()})
    got = run(cached)
    assert torch.allclose(got, run(plain), rtol=1e-5, atol=1e-6) and not torch.equal(got, before)


def test_dtype_and_state_dict_changes_through_the_pipeline():
    tp, plain = _fresh_flux_pair()
    cached = compiled(tp, adacache.NoCache())
    run(cached)
    state = {k: v * 1.1 for k, v in plain.pipe.transformer.state_dict().items()}
    cached.pipe.transformer.load_state_dict(state, assign=True)
    plain.pipe.transformer.load_state_dict(state, assign=True)
    assert torch.allclose(run(cached), run(plain), rtol=1e-5, atol=1e-6)
    cached.pipe.transformer.load_state_dict({k: v * 0.9 for k, v in state.items()})  # in place
    plain.pipe.transformer.load_state_dict({k: v * 0.9 for k, v in state.items()})
    assert torch.allclose(run(cached), run(plain), rtol=1e-5, atol=1e-6)
    cached.pipe.to(torch.bfloat16)
    plain.pipe.to(torch.bfloat16)
    assert next(cached.pipe.transformer.parameters()).dtype == torch.bfloat16
    assert torch.allclose(run(cached), run(plain), rtol=1e-2, atol=1e-2)


def test_components_save_pretrained_and_uncompile(tmp_path):
    tp = shared("sd3")
    cached = adacache.compile(tp.pipe, adacache.FORA(interval=2))
    assert cached.components["transformer"] is cached.transformer
    assert tp.pipe.transformer is adacache.uncompile(cached.transformer), "the pipeline passed in is unchanged"
    assert not isinstance(tp.pipe.transformer, adacache.CachedModule) and type(tp.pipe) is not type(cached)
    run(dataclasses.replace(tp, pipe=cached))
    cached.transformer.save_pretrained(tmp_path / "transformer")
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel" and "adacache" not in json.dumps(config)
    reloaded = type(tp.pipe.transformer).from_pretrained(tmp_path / "transformer")
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), tp.pipe.transformer.state_dict().items()):
        assert torch.equal(a, b), name
    plain = adacache.uncompile(cached)
    assert type(plain) is type(tp.pipe) and plain.transformer is tp.pipe.transformer
    assert torch.equal(run(dataclasses.replace(tp, pipe=plain)), run(tp))


def test_two_threads_share_one_compiled_transformer():
    """Two pipelines over one compiled transformer, each with its own tokenizers and scheduler
    (Hugging Face fast tokenizers are not thread-safe: a shared one gave a thread the other's
    padding, a new signature mid-request): every output bitwise equal to the request alone."""
    tp = PIPELINES["flux"]()
    policy = adacache.TaylorSeer(order=1, interval=2)

    def own(pipe):
        parts = {k: copy.deepcopy(v) for k, v in pipe.components.items() if k.startswith(("tokenizer", "scheduler"))}
        return type(pipe).from_pipe(pipe, **parts)

    first = adacache.compile(own(tp.pipe), policy)
    second = own(tp.pipe)
    second.transformer = first.transformer
    pipes = [first, adacache.compile(second, policy)]
    assert pipes[1].transformer is first.transformer
    seeds = [0, 1]
    expected = [run(dataclasses.replace(tp, pipe=adacache.compile(own(tp.pipe), policy)), seed=s) for s in seeds]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(3):
            results[i].append(run(dataclasses.replace(tp, pipe=pipes[i]), seed=seeds[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in (0, 1):
        assert len(results[i]) == 3
        for r in results[i]:
            assert torch.equal(r, expected[i]), float((r - expected[i]).abs().max())


# -- known bugs of other caching systems, as named tests ----------------------------------

def test_no_cache_context_needed_outside_a_pipeline_call():
    """diffusers #12012 / #12760: a transformer with a cache hook failed when called without a
    cache context. A compiled transformer needs none: called directly, it is a request of its own."""
    tp = shared("flux")
    cached = adacache.compile(tp.pipe, adacache.FORA(interval=2))
    run(dataclasses.replace(tp, pipe=cached))
    inputs = _transformer_inputs(tp)
    with torch.no_grad():
        direct = [cached.transformer(**dict(inputs, timestep=torch.full((1,), t))).sample for t in (0.9, 0.8, 0.7)]
        plain = tp.pipe.transformer(**inputs).sample
    assert torch.allclose(direct[0], plain, rtol=1e-5, atol=1e-6), "a request of its own: its first call computes"
    assert adacache.summary(cached.transformer).generations >= 1


def _transformer_inputs(tp: TinyPipeline, tokens: int = 16, batch: int = 1, t: float = 0.9) -> dict:
    gen = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(batch, tokens, 16, generator=gen),
        encoder_hidden_states=torch.randn(batch, 16, 16, generator=gen),
        pooled_projections=torch.randn(batch, 16, generator=gen),
        timestep=torch.full((batch,), t), guidance=torch.full((batch,), 3.5),
        img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(16, 3), return_dict=True,
    )


@pytest.mark.parametrize("change", ["tokens", "batch"])
def test_shape_change_between_steps_recomputes(change):
    """diffusers #14829 (sequence length changing between steps) and ComfyUI-WanVideoWrapper #174
    (batch size change of cached residuals): the call with the new shape computes in full."""
    tp = shared("flux")
    cached = adacache.compile(tp.pipe.transformer, adacache.FORA(interval=2))
    cached.adacache.new_request()
    steps = [0.9, 0.8, 0.7, 0.6]
    with torch.no_grad():
        for i, t in enumerate(steps):
            shape = dict(tokens=16 if i < 2 else 64) if change == "tokens" else dict(batch=1 if i < 2 else 2)
            inputs = _transformer_inputs(tp, t=t, **shape)
            got = cached(**inputs).sample
            if i == 2:
                want = tp.pipe.transformer(**inputs).sample
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), "a new shape must not reuse the old cache"
    assert cached.adacache.current_session().stats.invalidations == 1


def test_model_cpu_offload_wraps_the_compiled_transformer():
    """accelerate's offload hook replaces ``forward`` on the transformer instance; the capture
    must still trace the model's own forward, and the requests equal a pipeline without it."""
    pytest.importorskip("accelerate")
    tp = PIPELINES["sd3"]()
    policy = adacache.FORA(interval=2)
    expected = run(compiled(shared("sd3"), policy))
    offloaded = compiled(tp, policy)
    offloaded.pipe.enable_model_cpu_offload(device="cpu")
    assert "forward" in vars(offloaded.pipe.transformer), "accelerate wrapped the instance"
    for seed in (0, 0, 0):
        assert torch.equal(run(offloaded, seed=seed), expected)
    assert adacache.summary(offloaded.pipe).hit_rate > 0
    # accelerate moves the model with new buffer tensors, which the graph held: captured again,
    # with that reason (a known cost of offloading; see README).
    assert all("replaced or converted" in r.reason for r in offloaded.pipe.transformer.adacache.recaptures)
