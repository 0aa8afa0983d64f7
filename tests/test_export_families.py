"""ONNX export of the transformer of every pipeline family (issue 20): the calls of a real
run of the tiny pipeline are recorded, the transformer is compiled and exported from its
first call, and every recorded call with the artifact's input shapes is replayed to the
compiled model and to the loaded engine: parity within 1e-4 and the same reuse decisions."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

import adacache  # noqa: E402
from adacache.capture import signature_of  # noqa: E402
from pipelines import PIPELINES, run, shared  # noqa: E402

#: Families whose transformer cannot be exported, each with the error that says why.
REFUSED = {
    "qwenimage": "computes with complex tensors",  # its rotary embedding: torch.polar / view_as_complex
    "lumina2": "capture='blocks'",  # torch.export cannot capture it whole (caption packing with .tolist())
}
POLICIES = {"FORA": lambda: adacache.FORA(interval=2), "TaylorSeer": lambda: adacache.TaylorSeer(order=1, interval=2)}
#: The extra variants of tests/pipelines.py share their transformer families with others.
FAMILIES = sorted(n for n in PIPELINES if n not in ("wan22", "flux_img2img"))


def _recorded_calls(name: str) -> list[tuple[tuple, dict]]:
    tp = shared(name)
    calls = []

    def record(module, args, kwargs):
        calls.append(tuple(_detached((args, kwargs))))

    handle = tp.pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run(tp)
    finally:
        handle.remove()
    return calls


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("name", FAMILIES)
def test_the_engine_answers_as_the_compiled_model(name, policy, tmp_path):
    calls = _recorded_calls(name)
    transformer = shared(name).pipe.transformer
    compiled = adacache.compile(transformer, POLICIES[policy]())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", adacache.CaptureFallbackWarning)
        if name in REFUSED:
            with pytest.raises(adacache.ExportError, match=REFUSED[name]):
                adacache.export(compiled, tmp_path / "a", example_inputs=calls[0])
            return
        adacache.export(compiled, tmp_path / "a", example_inputs=calls[0])
    engine = adacache.load(tmp_path / "a", provider="cpu")
    names = [spec["name"] for spec in engine.inputs]
    same_shapes = [c for c in calls if signature_of(*c) == signature_of(*calls[0])]
    assert len(same_shapes) >= 4, "the replay covers both branches"
    compiled.adacache.new_request()
    engine.new_request()
    signature = inspect.signature(type(transformer).forward)
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(same_shapes):
            expected = compiled(*args, **kwargs)
            expected = (expected[0] if isinstance(expected, (tuple, list)) else expected.sample).numpy()
            by_name = signature.bind(transformer, *args, **kwargs).arguments  # the engine takes inputs by name
            got = engine(**{k: by_name[k].numpy() for k in names})["output_0"]
            scale = max(1.0, float(np.abs(expected).max()))
            assert float(np.abs(got - expected).max()) <= 1e-4 * scale, f"call {i}"
    summary = adacache.summary(compiled)
    assert engine.reused == {s.site: s.reused for s in summary.sites}
    assert sum(engine.reused.values()) > 0, "the replay reused something"
