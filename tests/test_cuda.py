"""The CUDA path: caches live on the GPU, decisions and outputs match the CPU's, compile
does not re-trace, half precision keeps its dtype, and a model moved after capture works.

These tests skip on a machine without a CUDA device (conftest says why). To check their
logic without one, ``ADACACHE_TEST_DEVICE=cpu`` runs them against the CPU itself.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import adacache
from families import FAMILIES
from helpers import denoise, moving

DEVICE = torch.device(os.environ.get("ADACACHE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.gpu if DEVICE.type == "cuda" else []


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 matmuls differ from the CPU by ~1e-3; these tests compare in true float32."""
    if DEVICE.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on(device: torch.device, inputs):
    return lambda t: {k: v.to(device) for k, v in inputs(t).items()}


def moved(model: torch.nn.Module) -> torch.nn.Module:
    """A copy on the device: ``Module.to`` moves parameters in place, under the CPU program too."""
    return copy.deepcopy(model).to(DEVICE)


def decisions(cached: torch.nn.Module) -> list[dict[str, bool]]:
    return [row["reused"] for row in adacache.summary(cached).per_step]


def state_devices(cached: torch.nn.Module) -> set[str]:
    return {t.device.type for slot in cached.adacache.current_session().slots.values() for t in slot.tensors}


POLICIES = {
    "FORA": lambda: adacache.FORA(interval=3),
    "TaylorSeer": lambda: adacache.TaylorSeer(order=1, interval=3),
    # On this random model the probe's relative change sits near 1.3; 1.1 splits the steps
    # with a margin (>0.01) far above the CPU/GPU rounding difference.
    "FirstBlockCache": lambda: adacache.FirstBlockCache(threshold=1.1),
    "AdaCorrection": lambda: adacache.AdaCorrection(base=adacache.FORA(interval=3), veto=0.3),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("policy", ["FORA", "TaylorSeer"])
def test_families_on_the_gpu_match_the_cpu(family, policy):
    model, inputs, _ = FAMILIES[family]()
    on_cpu = adacache.compile(model, POLICIES[policy]())
    expected = denoise(on_cpu, inputs)
    on_gpu = adacache.compile(moved(model), POLICIES[policy]())
    got = denoise(on_gpu, on(DEVICE, inputs))
    assert state_devices(on_gpu) == {DEVICE.type}, "every cache tensor lives on the model's device"
    assert decisions(on_gpu) == decisions(on_cpu)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert torch.allclose(a, b.cpu(), atol=1e-4, rtol=1e-4), f"step {step}"


@pytest.mark.parametrize("policy, move, steps", [("FirstBlockCache", False, 16), ("AdaCorrection", True, 8)])
def test_decisions_computed_on_the_gpu_match_the_cpu(policy, move, steps):
    model, still, _ = FAMILIES["tiny_dit"]()
    inputs = moving(still) if move else still
    on_cpu = adacache.compile(model, POLICIES[policy]())
    expected = denoise(on_cpu, inputs, steps=steps)
    on_gpu = adacache.compile(moved(model), POLICIES[policy]())
    got = denoise(on_gpu, on(DEVICE, inputs), steps=steps)
    assert decisions(on_gpu) == decisions(on_cpu)
    assert 0 < adacache.summary(on_gpu).hit_rate < 1, "a decision that varies, or the test shows nothing"
    for a, b in zip(expected, got):
        assert torch.allclose(a, b.cpu(), atol=1e-4, rtol=1e-4)


def test_no_cache_on_the_gpu_is_the_model():
    model, inputs, _ = FAMILIES["flux"]()
    model = model.to(DEVICE)
    expected = denoise(model, on(DEVICE, inputs))
    got = denoise(adacache.compile(model, adacache.NoCache()), on(DEVICE, inputs))
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_inductor_on_the_gpu_matches_eager_and_never_recompiles():
    import torch._dynamo.utils as dynamo_utils

    model, inputs, _ = FAMILIES["tiny_dit"]()
    model, inputs = model.to(DEVICE), on(DEVICE, inputs)
    eager = denoise(adacache.compile(model, adacache.TaylorSeer(order=1, interval=3)), inputs)
    compiled = adacache.compile(model, adacache.TaylorSeer(order=1, interval=3), backend="inductor")
    first = denoise(compiled, inputs)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    with compiled.adacache.session():
        second = denoise(compiled, inputs)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs, "skipping must not re-trace"
    for a, b, c in zip(eager, first, second):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4) and torch.equal(b, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_caches_keep_the_model_dtype(dtype):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    model = model.to(DEVICE, dtype)

    def half(t):
        kw = inputs(t)
        return dict(kw, x=kw["x"].to(DEVICE, dtype), timestep=kw["timestep"].to(DEVICE), class_labels=kw["class_labels"].to(DEVICE))

    expected = denoise(model, half)
    assert all(torch.equal(a, b) for a, b in zip(expected, denoise(adacache.compile(model, adacache.NoCache()), half)))
    cached = adacache.compile(model, adacache.TaylorSeer(order=1, interval=3))
    got = denoise(cached, half)
    floats = {t.dtype for s in cached.adacache.current_session().slots.values() for t in s.tensors if t.is_floating_point()}
    assert floats == {dtype}, "caches are stored in the model's precision"
    assert all(a.dtype == dtype and torch.isfinite(a).all() for a in got)
    assert torch.equal(got[0], expected[0]), "the first step computes everything"


def test_a_model_moved_after_its_first_call_recaptures_on_the_new_device():
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, adacache.FORA(interval=3))
    denoise(cached, inputs, steps=2)
    cached.to(DEVICE)  # moves the wrapped model; the CPU program is keyed by its inputs' device
    with cached.adacache.session():
        got = denoise(cached, on(DEVICE, inputs))
        assert state_devices(cached) == {DEVICE.type}
    expected = denoise(adacache.compile(model, adacache.FORA(interval=3)), on(DEVICE, inputs))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    captured_on = {leaf[-1].split(":")[0] for p in cached.adacache.programs for leaf in p.captured.signature.leaves if leaf[0] == "tensor"}
    assert captured_on == {"cpu", DEVICE.type}, "one program per device"


def test_zcache_sampling_on_the_gpu_matches_the_cpu():
    from diffusers import DDIMScheduler

    model, inputs, _ = FAMILIES["tiny_dit"]()
    kw = inputs(torch.tensor(0.0))

    def run(device):
        cached = adacache.compile(copy.deepcopy(model).to(device), adacache.ZCache(base=adacache.TaylorSeer(order=1, interval=3)))
        scheduler = DDIMScheduler(num_train_timesteps=1000)
        scheduler.set_timesteps(12, device=device)
        labels = kw["class_labels"].to(device)

        def step(m, x, t):
            return m(x=x, timestep=t.expand(x.shape[0]).float(), class_labels=labels)[:, :4]

        out = adacache.sample(cached, scheduler, kw["x"].to(device), step)
        return out.cpu(), cached.adacache.current_session().stats.replays

    (expected, replays_cpu), (got, replays_gpu) = run(torch.device("cpu")), run(DEVICE)
    assert replays_gpu == replays_cpu > 0
    assert torch.allclose(expected, got, atol=1e-4, rtol=1e-4)


def test_onnx_runtime_cuda_provider_matches_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'adacache[onnx]')")
    if DEVICE.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no CUDA provider (has {ort.get_available_providers()}); pip install 'adacache[gpu]'")
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, adacache.FORA(interval=3))
    timesteps = torch.linspace(950, 50, 12).round()
    adacache.export(cached, tmp_path / "art", example_inputs=((), inputs(timesteps[0])))
    engine = adacache.load(tmp_path / "art", provider="cuda" if DEVICE.type == "cuda" else "cpu")
    assert engine.device == DEVICE.type
    with torch.no_grad():
        for t in timesteps:
            expected = cached(**inputs(t)).numpy()
            got = engine(**{k: v.numpy() for k, v in inputs(t).items()})["output_0"]
            assert abs(got - expected).max() < 1e-3
    assert engine.reused == {"site_0": 8}, "steps 1, 2, 4, 5, 7, 8, 10, 11 reuse"
