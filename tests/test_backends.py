"""Backends: torch.compile without re-tracing, ONNX export + ONNX Runtime parity, TensorRT checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import adacache
from adacache.backends.tensorrt import check_tensorrt_compatible
from adacache.policies import FORA
from adacache.policies.base import policy_dataclass
from families import FAMILIES
from helpers import denoise

STEPS = torch.linspace(950, 50, 50).round()


def test_inductor_backend_matches_eager_and_never_recompiles():
    import torch._dynamo.utils as dynamo_utils

    model, inputs, _ = FAMILIES["tiny_dit"]()
    eager = denoise(adacache.compile(model, FORA(interval=3)), inputs)
    compiled = adacache.compile(model, FORA(interval=3), backend="inductor")
    first = denoise(compiled, inputs)  # compiles once, on the first call
    graphs_after_first = dynamo_utils.counters["stats"]["unique_graphs"]
    second = denoise(compiled, inputs)  # a second request of the same shapes
    with compiled.adacache.session():
        denoise(compiled, inputs)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs_after_first, "skipping must not re-trace"
    for a, b, c in zip(eager, first, second):
        assert torch.allclose(a, b, atol=1e-4) and torch.equal(b, c)
    assert adacache.summary(compiled).hit_rate > 0.5


@pytest.fixture(scope="module")
def fora_artifact(tmp_path_factory):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, FORA(interval=3))
    path = tmp_path_factory.mktemp("artifact") / "dit-fora"
    adacache.export(cached, path, example_inputs=((), inputs(STEPS[0])))
    return path, model, inputs


def test_manifest_describes_every_state_and_the_policy(fora_artifact):
    path, _, _ = fora_artifact
    manifest = json.loads((path / "manifest.json").read_text())
    # No pickles, nothing executable: the checked calls are plain arrays (np.load refuses objects).
    assert sorted(os.listdir(path)) == ["check.npz", "manifest.json", "model.onnx"]
    with np.load(path / "check.npz", allow_pickle=False) as calls:
        assert all(calls[key].dtype != object for key in calls.files)
    assert manifest["policy"] == {"policy": "FORA", "interval": 3, "warmup": 0, "granularity": "block", "reuse": None, "anchor": "start"}
    assert manifest["schedules"]["site_0"] == {"kind": "interval", "interval": 3, "warmup": 0, "anchor": "start"}
    assert [s["name"] for s in manifest["states"]] == ["cache__site_0__0", "cache__site_0__valid"]
    assert manifest["states"][0] == {
        "name": "cache__site_0__0", "output": "cache__site_0__0__out", "site": "site_0", "kind": "cache",
        "shape": [2, 16, 64], "dtype": "float32", "initial": "zeros",
    }
    assert [i["name"] for i in manifest["inputs"] if i["role"] == "user"] == ["x", "timestep", "class_labels"]
    assert manifest["timestep_input"] == "timestep"
    assert manifest["versions"]["torch"] and manifest["versions"]["onnxruntime"]


def test_onnx_runtime_matches_eager_over_a_50_step_generation(fora_artifact):
    path, model, inputs = fora_artifact
    engine = adacache.load(path, provider="cpu")
    assert engine.provider == "CPUExecutionProvider"
    cached = adacache.compile(model, FORA(interval=3))
    cached.adacache.new_request()  # explicit boundaries: no ambiguous first step on either side
    engine.new_request()
    expected, got = [], []
    with torch.no_grad():
        for t in STEPS:
            feeds = inputs(t)
            expected.append(cached(**feeds).numpy())
            got.append(engine(**{k: v.numpy() for k, v in feeds.items()})["output_0"])
    # Compared after the whole generation: a returned array must not change under later calls.
    worst = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
    assert worst < 1e-4
    assert engine.reused == {"site_0": 33}, "same skip decisions as eager"


def test_onnx_first_block_cache_decisions_match_eager(tmp_path):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, adacache.FirstBlockCache(1.5))
    adacache.export(cached, tmp_path / "fbc", example_inputs=((), inputs(STEPS[0])))
    engine = adacache.load(tmp_path / "fbc", provider="cpu")
    steps = torch.linspace(950, 50, 8)
    with torch.no_grad():
        for t in steps:
            feeds = inputs(t)
            expected = cached(**feeds).numpy()
            got = engine(**{k: v.numpy() for k, v in feeds.items()})["output_0"]
            assert np.abs(got - expected).max() < 1e-4
    assert engine.reused["site_1"] == adacache.summary(cached).sites[1].reused > 0


def test_loader_needs_no_torch(fora_artifact):
    path, _, inputs = fora_artifact
    feeds = {k: v.numpy() for k, v in inputs(STEPS[0]).items()}
    np.savez(path.parent / "feeds.npz", **feeds)
    script = textwrap.dedent(f"""
        import sys, numpy as np
        import adacache
        engine = adacache.load({str(path)!r}, provider="cpu")
        feeds = dict(np.load({str(path.parent / 'feeds.npz')!r}))
        out = engine(**feeds)["output_0"]
        assert out.shape == (2, 8, 8, 8), out.shape
        assert "torch" not in sys.modules, "the loader imported torch"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_bad_artifacts_and_inputs_get_clear_errors(fora_artifact, tmp_path):
    path, _, inputs = fora_artifact
    with pytest.raises(adacache.ArtifactError, match="no artifact folder"):
        adacache.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(adacache.ArtifactError, match="has no manifest.json"):
        adacache.load(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(adacache.ArtifactError, match="not valid JSON"):
        adacache.load(broken)
    manifest = json.loads((path / "manifest.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps(dict(manifest, format_version=0)))
    with pytest.raises(adacache.ArtifactError, match="format version 0"):
        adacache.load(old)

    engine = adacache.load(path, provider="cpu")
    feeds = {k: v.numpy() for k, v in inputs(STEPS[0]).items()}
    with pytest.raises(adacache.ArtifactError, match="input 'x' has shape \\[1, 4, 8, 8\\]"):
        engine(**dict(feeds, x=feeds["x"][:1]))
    with pytest.raises(adacache.ArtifactError, match="input 'class_labels' has dtype int32"):
        engine(**dict(feeds, class_labels=feeds["class_labels"].astype(np.int32)))
    with pytest.raises(adacache.ArtifactError, match="missing \\['class_labels'\\]"):
        engine(x=feeds["x"], timestep=feeds["timestep"])


@policy_dataclass
class _EagerOnly(FORA):
    backends = ("eager", "inductor")


def test_policy_a_backend_cannot_express_is_refused_with_alternatives(tmp_path):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, _EagerOnly(interval=2))
    with pytest.raises(adacache.ExportError, match="_EagerOnly cannot be exported to onnx.*backend='inductor'"):
        adacache.export(cached, tmp_path / "x", example_inputs=((), inputs(STEPS[0])))


def test_onnx_export_is_tensorrt_compatible(fora_artifact):
    path, _, _ = fora_artifact
    assert check_tensorrt_compatible(path / "model.onnx") == []


def test_tensorrt_check_reports_what_it_cannot_build(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    then_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y_then"])], "then", [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [2])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y_else"])], "else", [], [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("If", ["pred"], ["y"], then_branch=then_graph, else_branch=else_graph, name="the_if"),
        helper.make_node("MyOp", ["y"], ["z"], domain="com.example", name="custom"),
        helper.make_node("StringNormalizer", ["s"], ["s2"], name="strings"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("pred", TensorProto.FLOAT, [1]), helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("s2", TensorProto.STRING, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    onnx.save(model, tmp_path / "bad.onnx")
    problems = "\n".join(check_tensorrt_compatible(tmp_path / "bad.onnx"))
    assert "predicate pred must be a 0-D bool, got FLOAT of rank 1" in problems
    assert "custom domain 'com.example'" in problems
    assert "StringNormalizer is not in TensorRT's ONNX support list" in problems
    assert "input x has a dynamic shape" in problems


@pytest.mark.gpu
def test_tensorrt_engine_matches_onnx_runtime(tmp_path):  # pragma: no cover - needs a GPU
    pytest.importorskip("tensorrt", reason="tensorrt is not installed (pip install 'adacache[gpu]')")
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model.cuda(), FORA(interval=3))
    feeds = lambda t: {k: v.cuda() for k, v in inputs(t).items()}  # noqa: E731
    adacache.export(cached, tmp_path / "trt", format="tensorrt", precision="fp32", example_inputs=((), feeds(STEPS[0])))
    engine = adacache.load(tmp_path / "trt")
    with torch.no_grad():
        for t in STEPS[:10]:
            expected = cached(**feeds(t)).cpu().numpy()
            got = engine(**{k: v.cpu().numpy() for k, v in feeds(t).items()})["output_0"]
            assert np.abs(got - expected).max() < 1e-3


def test_onnx_runtime_matches_eager_on_the_reference_model(tmp_path):
    """The parity claim on the shipped model: a full 50-step CFG generation, every step."""
    from types import SimpleNamespace

    from adacache.reference import load_reference_model, sample

    model = load_reference_model()
    cached = adacache.compile(model, FORA(interval=3))
    labels = [1, 7]
    calls: list[dict] = []

    def record(**kwargs):
        calls.append(kwargs)
        return model(**kwargs)

    with torch.inference_mode():
        sample(record, labels, seeds=[0, 1], num_steps=2, guidance_scale=4.0)
    adacache.export(cached, tmp_path / "ref", example_inputs=((), calls[0]))
    engine = adacache.load(tmp_path / "ref", provider="cpu")
    worst = []

    def both(**kwargs):
        expected = cached(**kwargs).sample
        got = engine(**{k: v.numpy() for k, v in kwargs.items()})["output_0"]
        worst.append(float(np.abs(got - expected.numpy()).max()))
        return SimpleNamespace(sample=expected)

    cached.adacache.new_request()  # `both` is a plain function: set the boundary on each side
    engine.new_request()
    with torch.inference_mode():
        sample(both, labels, seeds=[0, 1], num_steps=50, guidance_scale=4.0)
    assert len(worst) == 50 and max(worst) < 1e-4
    assert engine.reused == {"site_0": 33}, "the same skip decisions: 33 of 50 steps reuse the span of all 8 blocks"


class _TextThenImage(torch.nn.Module):
    """A block that runs on [text; image] tokens and returns the image part, a slice that is
    contiguous but starts past the text (Flux's single-stream blocks at batch 1)."""

    def __init__(self, dim: int, text: torch.Tensor) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, dim))
        self.register_buffer("text", text)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.text.expand(x.shape[0], -1, -1), x], dim=1)
        h = h + self.mlp(h)
        return h[:, self.text.shape[1]:]


class _SlicedOutputs(torch.nn.Module):
    def __init__(self, dim: int = 16, blocks: int = 3) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Linear(1, dim)
        self.transformer_blocks = torch.nn.ModuleList(_TextThenImage(dim, torch.randn(1, 5, dim, generator=gen)) for _ in range(blocks))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = x + self.embed(timestep.reshape(-1, 1, 1) / 1000)
        for block in self.transformer_blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("policy", [FORA(interval=2), adacache.TaylorSeer(order=1, interval=3)], ids=["FORA", "TaylorSeer"])
def test_blocks_returning_a_sliced_view_compile_and_export(policy, tmp_path):
    """A cond's branches must return tensors of one layout, storage offset included; the
    computed branch's output here is a view at offset 5 * 16, the reused one a new tensor."""
    model = _SlicedOutputs().eval()
    x = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(1))
    inputs = lambda t: {"x": x * (1 + t / 1000), "timestep": t.reshape(1)}  # noqa: E731
    timesteps = torch.linspace(900, 100, 6)
    with torch.no_grad():
        reference = [model(**inputs(t)) for t in timesteps]
        eager = adacache.compile(model, policy)
        eager.adacache.new_request(len(timesteps))
        expected = [eager(**inputs(t)) for t in timesteps]
        inductor = adacache.compile(model, policy, backend="inductor")
        inductor.adacache.new_request(len(timesteps))
        got = [inductor(**inputs(t)) for t in timesteps]
    assert torch.allclose(expected[0], reference[0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, expected))
    assert adacache.summary(inductor).hit_rate > 0
    adacache.export(eager, tmp_path / "sliced", example_inputs=((), inputs(timesteps[0])))
    engine = adacache.load(tmp_path / "sliced", provider="cpu")
    engine.new_request()
    for t, want in zip(timesteps, expected):
        out = engine(**{k: v.numpy() for k, v in inputs(t).items()})["output_0"]
        assert abs(out - want.numpy()).max() < 1e-4


# -- export-time verification (issue 20) ------------------------------------------------------

class _GuardedDivision(torch.nn.Module):
    """Sana's linear attention divides by a sum that can be exactly 0, guarded by + 1e-15;
    onnxscript's optimizer folds the guard away (its constant match tolerates 1e-8)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = torch.relu(-x.abs())  # exactly 0 everywhere, which the exporter cannot know
        ratio = zero[..., :-1] / (zero[..., -1:] + 1e-15)
        return x + self.mlp(x) + torch.nn.functional.pad(ratio, (0, 1))


class _GuardedModel(torch.nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(1, dim)
        self.transformer_blocks = torch.nn.ModuleList(_GuardedDivision(dim) for _ in range(3))
        self.head = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = x + self.embed(timestep.reshape(-1, 1, 1) / 1000)
        for block in self.transformer_blocks:
            x = block(x)
        return self.head(x)


def _guarded():
    model = _GuardedModel().eval()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(0))
    return model, (lambda t: {"x": x * (1 + t / 1000), "timestep": t.expand(2)})


def test_export_drops_the_optimizer_where_it_changes_numbers(tmp_path):
    model, inputs = _guarded()
    compiled = adacache.compile(model, FORA(interval=2))
    example = ((), inputs(STEPS[0]))
    unchecked = adacache.load(adacache.export(compiled, tmp_path / "unchecked", example_inputs=example, verify=False), provider="cpu")
    feeds = {k: v.numpy() for k, v in inputs(STEPS[0]).items()}
    assert np.isnan(unchecked(**feeds)["output_0"]).any(), "the premise: the optimized file answers NaN"

    artifact = adacache.export(compiled, tmp_path / "checked", example_inputs=example)
    verification = json.loads((artifact / "manifest.json").read_text())["verification"]
    assert verification["verified"] and not verification["optimized"]
    assert "output_0" in verification["optimizer_changed"] and "NaN" in verification["optimizer_changed"]
    engine = adacache.load(artifact, provider="cpu")
    compiled.adacache.new_request(6)
    engine.new_request()
    with torch.no_grad():
        for t in STEPS[:6]:
            want = compiled(**inputs(t)).numpy()
            got = engine(**{k: v.numpy() for k, v in inputs(t).items()})["output_0"]
            assert np.isfinite(got).all() and abs(got - want).max() < 1e-4
    assert engine.reused == {"site_0": 3}


def _corrupting(monkeypatch):
    """Make every written ONNX file compute something else: its first weight doubled."""
    import onnx

    from adacache.backends import onnx as onnx_backend

    write = onnx_backend._write_onnx

    def write_then_corrupt(*args, **kwargs):
        write(*args, **kwargs)
        path = args[3]
        proto = onnx.load(str(path))
        weight = next(i for i in proto.graph.initializer if len(i.dims) == 2)
        array = onnx.numpy_helper.to_array(weight) * 2
        weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
        onnx.save(proto, str(path))

    monkeypatch.setattr(onnx_backend, "_write_onnx", write_then_corrupt)


def test_an_artifact_that_computes_something_else_is_refused(fora_artifact, tmp_path, monkeypatch):
    _, model, inputs = fora_artifact
    compiled = adacache.compile(model, FORA(interval=3))
    _corrupting(monkeypatch)
    example = ((), inputs(STEPS[0]))
    with pytest.raises(adacache.ExportError, match="does not compute what the compiled model computes: output 'output_0' of the "
                                                   "computing, empty caches call .*max \\|difference\\|.*keep_failed=True"):
        adacache.export(compiled, tmp_path / "refused", example_inputs=example)
    assert not (tmp_path / "refused" / "model.onnx").exists() and not (tmp_path / "refused" / "manifest.json").exists()
    with pytest.raises(adacache.ExportError, match="kept for inspection"):
        adacache.export(compiled, tmp_path / "kept", example_inputs=example, keep_failed=True)
    assert (tmp_path / "kept" / "model.onnx").exists()


def test_a_file_onnx_runtime_cannot_load_is_an_artifact_error(fora_artifact, tmp_path):
    """A valid ONNX file that ONNX Runtime refuses (a Squeeze of a dimension of 64, what
    PixArt's export writes) is an ArtifactError, not ONNX Runtime's own exception."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    path, _, _ = fora_artifact
    copy = tmp_path / "squeeze"
    shutil.copytree(path, copy)
    graph = helper.make_graph(
        [helper.make_node("Squeeze", ["x", "axes"], ["y"])], "squeeze",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(copy / "model.onnx"))
    with pytest.raises(adacache.ArtifactError, match="ONNX Runtime cannot load .*re-export it"):
        adacache.load(copy, provider="cpu")


class _ComplexRotary(torch.nn.Module):
    """Rotates features with complex multiplication, as QwenImage's rotary embedding does."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        angles = torch.arange(4.0)[:, None] * torch.arange(1.0, 5.0)[None] / 4
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles))  # complex64 [tokens, pairs]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            rotated = torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], 4, 2)) * self.freqs).flatten(-2)
            x = x + block(rotated) * (timestep[:, None, None] / 1000)
        return x


def test_a_model_computing_with_complex_tensors_is_refused_naming_the_line(tmp_path):
    model = _ComplexRotary().eval()
    inputs = ((), dict(x=torch.randn(2, 4, 8), timestep=torch.full((2,), 500.0)))
    with pytest.raises(adacache.ExportError, match="computes with complex tensors") as info:
        adacache.export(adacache.compile(model, adacache.FORA(interval=2)), tmp_path / "a", example_inputs=inputs)
    assert "torch.view_as_complex" in str(info.value) and "inductor" in str(info.value)
    assert not (tmp_path / "a" / "model.onnx").exists()
