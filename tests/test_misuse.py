"""Bad input and misuse: never a silent wrong result, and a clear adacache error for everything else.

One test per case of the issue; each failed on the code before its fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import adacache
from adacache.cli import main
from adacache.deploy import read_manifest
from adacache.errors import AdaCacheError, ArtifactError, PolicyError
from adacache.policies.parse import parse_policy
from families import FAMILIES

T0 = torch.tensor(950.0)


class _Ran(Exception):
    """Raised by the stand-ins for the command's real work: the command ran instead of refusing."""


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any real work of the command line fail fast, so a bad value that is not refused up
    front shows up as this exception (or as the raw error it causes) instead of a long run."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _Ran("the command started its work instead of refusing its arguments")

    monkeypatch.setattr("adacache.cli.load_named_model", refuse)
    for name in ("quality_track", "speed_track", "overhead_track"):
        monkeypatch.setattr(f"adacache.bench.tracks.{name}", refuse)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command line; check it exits 2 with a usage message; return stderr."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: adacache" in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, inputs, _ = FAMILIES["tiny_dit"]()
    path = tmp_path_factory.mktemp("misuse") / "fora"
    adacache.export(adacache.compile(model, adacache.FORA(interval=3)), path, example_inputs=((), inputs(T0)))
    return path


def _copy(artifact: Path, to: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    shutil.copytree(artifact, to)
    if edit is not None:
        manifest = json.loads((to / "manifest.json").read_text())
        edit(manifest)
        (to / "manifest.json").write_text(json.dumps(manifest))
    return to


# -- 1. *args / **kwargs in a policy expression -------------------------------------------

def test_policy_expression_star_arguments_and_repeated_keywords_are_refused(no_work, capsys):
    for text, why in [
        ("FORA(**{'interval': 7})", r"\*\*"),
        ("FORA(*[7])", r"\*"),
        ("AdaCorrection(base=FORA(**{'interval': 7}))", r"\*\*"),
        ("FORA(interval=3, interval=7)", "interval.*more than once"),
        ("FORA(3, interval=7)", "interval"),
    ]:
        with pytest.raises(PolicyError, match=why):
            parse_policy(text)
    err = _refused(["explain", "--model", "tiny", "--policy", "FORA(**{'interval': 7})"], capsys)
    assert "argument --policy" in err and "**" in err


# -- 2. non-finite and non-number policy parameters -----------------------------------------

def test_policy_numbers_must_be_finite_real_scalars():
    nan, inf = math.nan, math.inf
    for build, field in [
        (lambda: adacache.TeaCache(coefficients=(nan,)), "coefficients"),
        (lambda: adacache.TeaCache(coefficients=(1.0, inf)), "coefficients"),
        (lambda: adacache.TeaCache(threshold=inf), "threshold"),
        (lambda: adacache.FirstBlockCache(nan), "threshold"),
        (lambda: adacache.AdaCorrection(gamma=inf), "gamma"),
        (lambda: adacache.AdaCorrection(lam=inf), "lam"),
        (lambda: adacache.AdaCorrection(veto=nan), "veto"),
        (lambda: adacache.AdaCorrection(scales={"blocks.0": inf}), "scales"),
    ]:
        with pytest.raises(PolicyError, match=f"{field}.*finite"):
            build()
    # Not a number at all, or not a single one: the message is about the type, not a range.
    for build, field, kind in [
        (lambda: adacache.FirstBlockCache(torch.tensor([0.1, 0.2])), "threshold", "Tensor"),
        (lambda: adacache.FirstBlockCache("0.1"), "threshold", "str"),
        (lambda: adacache.FORA(interval=True), "interval", "bool"),
        (lambda: adacache.FORA(interval=3.0), "interval", "float"),
        (lambda: adacache.TaylorSeer(order=np.float32(1)), "order", "float32"),
        (lambda: adacache.TeaCache(coefficients=("1",)), "coefficients", "str"),
    ]:
        with pytest.raises(PolicyError, match=rf"{field}(\[\d+\])? must be an? (int|number).*{kind}") as info:
            build()
        assert "got" in str(info.value) and " in (" not in str(info.value) and ">=" not in str(info.value)
    # numpy scalars and 0-d tensors are numbers: converted, so the policy equals (and hashes,
    # and serialises) as the one built from Python numbers.
    assert adacache.FirstBlockCache(np.float32(0.25)) == adacache.FirstBlockCache(0.25)
    assert adacache.FirstBlockCache(torch.tensor(0.25)) == adacache.FirstBlockCache(0.25)
    fora = adacache.FORA(interval=np.int64(4), warmup=torch.tensor(1))
    assert fora == adacache.FORA(interval=4, warmup=1) and type(fora.interval) is int
    tea = adacache.TeaCache(np.float64(0.1), coefficients=np.array([2.0, 0.5]))
    assert tea == adacache.TeaCache(0.1, coefficients=(2.0, 0.5))
    ada = adacache.AdaCorrection(veto=np.float32(0.5), scales={"blocks.0": np.float32(2.0)})
    json.dumps(ada.to_dict())
    json.dumps(tea.to_dict())


# -- 3. model_file outside the artifact folder -------------------------------------------

def test_manifest_model_file_outside_the_artifact_is_refused(artifact, tmp_path):
    other = _copy(artifact, tmp_path / "other")
    outside = str((other / "model.onnx").resolve())
    cases = {
        "relative": lambda m: m.update(model_file="../other/model.onnx"),
        "absolute": lambda m: m.update(model_file=outside),
    }
    for name, edit in cases.items():
        with pytest.raises(ArtifactError, match="model_file.*outside"):
            adacache.load(_copy(artifact, tmp_path / name, edit), provider="cpu")
    linked = _copy(artifact, tmp_path / "linked")
    (linked / "model.onnx").unlink()
    (linked / "model.onnx").symlink_to(outside)
    with pytest.raises(ArtifactError, match="model_file.*outside"):
        adacache.load(linked, provider="cpu")
    inner = _copy(artifact, tmp_path / "inner")  # a link that stays inside the folder is fine
    (inner / "model.onnx").rename(inner / "real.onnx")
    (inner / "model.onnx").symlink_to("real.onnx")
    adacache.load(inner, provider="cpu")


# -- 4. bench --samples 0 / --repeats 0 ----------------------------------------------------

def test_bench_zero_samples_or_repeats_are_refused(no_work, capsys, tmp_path):
    for flag in ("--samples", "--repeats"):
        err = _refused(["bench", "--quick", flag, "0", "--out", str(tmp_path / "b")], capsys)
        assert f"argument {flag}" in err


# -- 5. the command line validates every argument up front -------------------------------

BAD_ARGUMENTS = [
    (["explain", "--policy", "3"], "--policy"),
    (["explain", "--policy", "Nope()"], "--policy"),
    (["explain", "--policy", "FORA(interval=0)"], "--policy"),
    (["explain", "--batch", "-1"], "--batch"),
    (["explain", "--batch", "0"], "--batch"),
    (["explain", "--batch", "two"], "--batch"),
    (["export", "--batch", "0", "--out", "{tmp}/a"], "--batch"),
    (["export", "--policy", "FORA(interval=-1)", "--out", "{tmp}/a"], "--policy"),
    (["export", "--out", "{tmp}/file"], "--out"),
    (["export", "--out", "{tmp}/file/below"], "--out"),
    (["bench", "--steps", "0"], "--steps"),
    (["bench", "--steps", "5000"], "--steps"),
    (["bench", "--threads", "-1"], "--threads"),
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--samples", "1"], "--samples"),
    (["bench", "--samples", "-3"], "--samples"),
    (["bench", "--repeats", "-1"], "--repeats"),
    (["bench", "--guidance", "nan"], "--guidance"),
    (["bench", "--guidance", "4.0", "inf"], "--guidance"),
    (["bench", "--guidance", "-1"], "--guidance"),
    (["bench", "--policies", "FORA(interval=3)", "Nope()"], "--policies"),
    (["bench", "--policies", "calibrated(FORA(interval=0))"], "--policies"),
    (["bench", "--speed-models", "dit-x"], "--speed-models"),
    (["bench", "--speed-models", "reference"], "--speed-models"),
    (["bench", "--overhead", "--overhead-models", "nope"], "--overhead-models"),
    (["bench", "--out", "{tmp}/file"], "--out"),
]


@pytest.mark.parametrize("argv, flag", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_command_line_refuses_bad_values_up_front(argv, flag, no_work, capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    err = _refused(argv, capsys)
    assert f"argument {flag}" in err, err


@pytest.mark.skipif(find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_command_line_export_to_tensorrt_without_tensorrt_is_refused_up_front(no_work, capsys, tmp_path):
    err = _refused(["export", "--format", "tensorrt", "--out", str(tmp_path / "e")], capsys)
    assert "tensorrt" in err


# -- 6. a corrupt model file ---------------------------------------------------------------

def test_corrupt_model_file_is_an_artifact_error(artifact, tmp_path):
    data = (artifact / "model.onnx").read_bytes()
    for name, content in [
        ("empty", b""),
        ("truncated", data[: len(data) // 2]),
        ("random", np.random.default_rng(0).bytes(4096)),
    ]:
        broken = _copy(artifact, tmp_path / name)
        (broken / "model.onnx").write_bytes(content)
        with pytest.raises(ArtifactError, match="model.onnx"):
            adacache.load(broken, provider="cpu")


# -- 8. example_inputs of the wrong form ----------------------------------------------------

def test_example_inputs_of_the_wrong_form_get_a_clear_error():
    from adacache.validate import check_example_inputs

    x = torch.zeros(2)
    for bad in [{"x": x}, (x, {}), ((x,),), ((), {}, {}), ((), {"x": x}.items()), ((), {1: x}), None, x]:
        with pytest.raises(TypeError, match=re.escape("(args, kwargs)")) as info:
            check_example_inputs(bad)
        assert isinstance(info.value, AdaCacheError)
    args, kwargs = check_example_inputs(([x], {"t": x}))
    assert args == (x,) and type(args) is tuple and kwargs == {"t": x} and type(kwargs) is dict
    assert check_example_inputs(((), {})) == ((), {})


def test_adacorrection_over_a_trajectory_policy_is_refused():
    # It used to be accepted and never reflect (summary(...).replays == 0).
    with pytest.raises(PolicyError, match="trajectory"):
        adacache.AdaCorrection(base=adacache.ZCache(base=adacache.TaylorSeer(order=1, interval=3)))
    with pytest.raises(PolicyError, match="trajectory"):
        adacache.policies.parse.parse_policy("AdaCorrection(base=ZCache(base=TaylorSeer(order=1, interval=3)))")


def test_engine_request_after_a_cancelled_one_equals_it_alone(artifact):
    """A cancelled generation (999, 979) must not leak into the next (500, 480, ...) in the
    ONNX engine either: the same request-boundary rules as eager."""
    _, inputs, _ = FAMILIES["tiny_dit"]()

    def feeds(t: float) -> dict[str, np.ndarray]:
        kw = inputs(torch.tensor(t))
        kw["x"] = kw["x"] * (1 + t / 700)  # a latent that moves, as in sampling
        return {k: v.numpy() for k, v in kw.items()}

    second = [500.0, 480.0, 460.0, 440.0]
    alone_engine = adacache.load(artifact, provider="cpu")
    alone = [alone_engine(**feeds(t))["output_0"] for t in second]
    engine = adacache.load(artifact, provider="cpu")
    for t in (999.0, 979.0):
        engine(**feeds(t))
    after = [engine(**feeds(t))["output_0"] for t in second]
    assert all(np.array_equal(a, b) for a, b in zip(after, alone))
    assert engine.reused["site_0"] > 0, "the engine reused within the second request"
    computed = adacache.load(artifact, provider="cpu")(**feeds(second[2]))["output_0"]
    assert not np.array_equal(computed, alone[2]), "a reused step differs from a computed one, or this test proves nothing"


def test_engine_refuses_batch_rows_at_different_timesteps(artifact):
    _, inputs, _ = FAMILIES["tiny_dit"]()
    kw = {k: v.numpy() for k, v in inputs(T0).items()}
    kw["timestep"] = np.array([950.0, 500.0], dtype=kw["timestep"].dtype)
    with pytest.raises(ArtifactError, match="different timesteps"):
        adacache.load(artifact, provider="cpu")(**kw)


@pytest.mark.parametrize("timestep", [950.0, 950, np.float32(950.0)], ids=["float", "int", "numpy"])
def test_timestep_given_as_a_number_is_refused_with_what_to_pass(timestep):
    # It used to capture a new graph at every step (the value is part of the signature) and reuse nothing.
    model, inputs, _ = FAMILIES["tiny_dit"]()
    compiled = adacache.compile(model, adacache.FORA(interval=2))
    kw = dict(inputs(T0), timestep=timestep)
    with torch.no_grad(), pytest.raises(adacache.InputError, match=r"torch\.tensor\(") as info:
        compiled(**kw)
    assert isinstance(info.value, TypeError)
    assert compiled.adacache.programs == [], "refused before anything was captured"


def test_a_caching_policy_under_autograd_is_refused_with_what_to_do():
    # It used to fail with raw autograd errors, or keep a growing autograd graph in TaylorSeer's cache.
    model, inputs, _ = FAMILIES["tiny_dit"]()
    compiled = adacache.compile(model, adacache.TaylorSeer(order=1, interval=2))
    with pytest.raises(adacache.SessionError, match="no_grad"):
        compiled(**inputs(T0))
    with torch.no_grad():
        compiled.adacache.new_request()
        compiled(**inputs(T0))
    nothing_cached = adacache.compile(model, adacache.NoCache())
    out = nothing_cached(**inputs(T0))  # no cache, nothing to refuse: gradients flow
    out.float().sum().backward()
    assert any(p.grad is not None for p in model.parameters())


# -- 13. the manifest schema -------------------------------------------------------------

def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets ``path`` (dots between keys, digits index lists) to ``value``."""

    def edit(manifest: dict[str, Any]) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        node: Any = manifest
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


_DELETE = object()

# (the field the error must name, the edit); each of these used to load, or fail later with a raw error.
MANIFEST_EDITS = [
    ("schedules.site_0.interval", _set("schedules.site_0.interval", 0)),  # ZeroDivisionError at the 1st call
    ("schedules.site_0.interval", _set("schedules.site_0.interval", 2.5)),
    ("schedules.site_0.kind", _set("schedules.site_0.kind", "sometimes")),
    ("schedules.site_0.warmup", _set("schedules.site_0.warmup", "0")),
    ("schedules.site_0.warmup", _set("schedules.site_0.warmup", _DELETE)),
    ("states.0.shape", _set("states.0.shape", [1 << 20, 1 << 20, 1 << 20])),  # MemoryError
    ("states.0.shape", _set("states.0.shape", [1, 2, 3])),  # not what the model file takes
    ("states.0.shape", _set("states.0.shape", [-1, 4])),
    ("states.0.dtype", _set("states.0.dtype", 3)),
    ("states.0.dtype", _set("states.0.dtype", "complex32")),
    ("states.0.name", _set("states.0.name", "nowhere")),
    ("inputs", _set("inputs", "x")),
    ("inputs.0.role", _set("inputs.0.role", "magic")),
    ("inputs.0.shape", _set("inputs.0.shape", [3, 3])),  # not what the model file takes
    ("inputs.0.dtype", _set("inputs.0.dtype", "int8")),
    ("controls.0.site", _set("controls.0.site", _DELETE)),
    ("controls.0.site", _set("controls.0.site", "site_9")),
    ("timestep_input", _set("timestep_input", 7)),
    ("timestep_input", _set("timestep_input", "not_an_input")),
    ("forecast", _set("forecast", "yes")),
    ("model_file", _set("model_file", 3)),
    ("sites.0.threshold", _set("sites.0.threshold", float("nan"))),
    ("signals.0", _set("signals", [{"name": "x", "site": "site_0"}])),
    ("surprise", _set("surprise", 1)),
    ("outputs.0.role", _set("outputs.0.role", "bonus")),
    # issue 28: the engine reused step 0's features at every later step
    ("schedules.site_0.kind", _set("schedules.site_0", {"kind": "after_warmup", "warmup": 0})),
    # issue 28: said "written with version 1, this adacache reads version 1"
    ("format_version", _set("format_version", "1")),
]


@pytest.mark.parametrize("field, edit", MANIFEST_EDITS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(MANIFEST_EDITS)])
def test_manifest_outside_the_schema_is_refused_naming_the_field(artifact, tmp_path, field, edit):
    broken = _copy(artifact, tmp_path / "broken", edit)
    with pytest.raises(ArtifactError) as info:
        adacache.load(broken, provider="cpu")
    assert field in str(info.value), f"the error should name {field!r}: {info.value}"


def test_a_forecast_order_edited_in_a_manifest_is_refused_at_load(tmp_path):
    """Issue 28: it failed at the first call, inside ONNX Runtime."""
    model, inputs, _ = FAMILIES["tiny_dit"]()
    path = adacache.export(adacache.compile(model, adacache.TaylorSeer(order=1, interval=3)), tmp_path / "ts",
                           example_inputs=((), inputs(T0)))
    broken = _copy(path, tmp_path / "broken", _set("forecast.order", 3))
    with pytest.raises(ArtifactError, match=r"forecast\.order: 3 needs 4 coefficients"):
        adacache.load(broken, provider="cpu")


def test_every_manifest_adacache_writes_is_inside_the_schema(tmp_path):
    from adacache.deploy.manifest import check_manifest

    model, inputs, _ = FAMILIES["tiny_dit"]()
    policies = [adacache.NoCache(), adacache.FORA(interval=3), adacache.FirstBlockCache(0.2),
                adacache.TaylorSeer(order=2, interval=3), adacache.TeaCache(0.2, coefficients=(1.0, 0.0))]
    for i, policy in enumerate(policies):
        path = adacache.export(adacache.compile(model, policy), tmp_path / str(i), example_inputs=((), inputs(T0)))
        manifest = read_manifest(path)
        adacache.load(path, provider="cpu")
        # The TensorRT form names its engine and keeps its ONNX source beside it.
        (path / "onnx").mkdir()
        shutil.copy(path / "model.onnx", path / "onnx" / "model.onnx")
        (path / "model.engine").write_bytes(b"engine")
        check_manifest(dict(manifest, backend="tensorrt", model_file="model.engine", precision="fp16",
                            onnx_file="onnx/model.onnx"), path)


def test_the_schema_knows_every_schedule_kind_and_dtype_the_runtime_knows():
    from adacache import stepping
    from adacache.deploy.manifest import manifest_schema
    from adacache.deploy.onnx_engine import _NUMPY_DTYPES

    defs = manifest_schema()["$defs"]
    assert tuple(defs["schedule"]["properties"]["kind"]["enum"]) == stepping.SCHEDULE_KINDS
    assert set(defs["dtype"]["enum"]) == set(_NUMPY_DTYPES)


# -- 14. a non-finite input at a reuse step ----------------------------------------------

NAN_POLICIES = {
    "fora": adacache.FORA(interval=3),
    "fora_module": adacache.FORA(interval=3, granularity="module"),
    "first_block_cache": adacache.FirstBlockCache(1.5),
    "taylorseer": adacache.TaylorSeer(order=1, interval=3),
    "adacorrection": adacache.AdaCorrection(base=adacache.FORA(interval=3), veto=1.0),
}


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


@pytest.mark.parametrize("policy", list(NAN_POLICIES.values()), ids=list(NAN_POLICIES))
@pytest.mark.parametrize("family, field", [("tiny_dit", "x"), ("sd3", "hidden_states"), ("sd3", "encoder_hidden_states")])
def test_a_non_finite_input_at_a_reuse_step_gives_the_models_own_output(family, field, policy):
    # It used to be hidden: the reused features were finite, so was the output, while the
    # model's own output was NaN (FORA over SD3 with a NaN in the text embedding).
    model, inputs, _ = FAMILIES[family]()
    timesteps = [999.0, 990.0, 980.0, 970.0, 960.0, 950.0]
    nan_step = 2

    def run(poison: bool) -> tuple[list[int], torch.Tensor]:
        compiled = adacache.compile(model, policy)
        reused, out_at_nan = [], None
        with torch.no_grad():
            compiled.adacache.new_request(total_steps=len(timesteps))
            for step, t in enumerate(timesteps):
                kw = inputs(torch.tensor(t))
                if poison and step == nan_step:
                    kw[field] = kw[field].clone()
                    kw[field].view(-1)[3] = float("nan")
                before = _reused(compiled)
                out = _first(compiled(**kw))
                reused.append(_reused(compiled) - before)
                if poison and step == nan_step:
                    out_at_nan = out
                    torch.testing.assert_close(out, _first(model(**kw)), rtol=0, atol=0, equal_nan=True)
        return reused, out_at_nan

    clean, _ = run(poison=False)
    assert clean[nan_step] > 0, "with finite inputs the policy reuses at this step, or the test proves nothing"
    poisoned, out = run(poison=True)
    assert not torch.isfinite(out).all()
    assert poisoned[nan_step] == 0
    assert sum(poisoned[nan_step + 1 :]) > 0, "reuse goes on after the non-finite step"


def _reused(compiled: Any) -> int:
    return sum(r for r, _ in compiled.adacache.current_session().stats.totals().values())


def test_a_non_finite_input_in_the_onnx_engine_gives_a_non_finite_output(artifact):
    _, inputs, _ = FAMILIES["tiny_dit"]()
    engine = adacache.load(artifact, provider="cpu")
    engine.new_request()
    for step, t in enumerate([999.0, 950.0, 900.0]):
        feeds = {k: v.numpy().copy() for k, v in inputs(torch.tensor(t)).items()}
        if step == 2:
            feeds["x"].reshape(-1)[3] = np.nan
        out = engine(**feeds)["output_0"]
    assert engine.reused["site_0"] == 1, "step 1 reused, step 2 (not finite) computed"
    assert not np.isfinite(out).all()


# -- 15. calibrated scales on another model -------------------------------------------------

def test_scales_calibrated_on_one_model_are_refused_on_another_with_the_same_blocks():
    # They used to run on any model whose block names matched, without a word.
    from helpers import denoise, moving

    model, still, _ = FAMILIES["tiny_dit"]()
    inputs = moving(still)
    fitted = adacache.calibrate(model, adacache.AdaCorrection(base=adacache.FORA(interval=3), veto=0.4),
                                lambda d: denoise(d, inputs, steps=6))
    assert fitted.calibrated_on is not None and "calibrated_on" not in fitted.describe()
    denoise(adacache.compile(model, fitted), inputs)  # its own model: fine
    half = FAMILIES["tiny_dit"]()[0].to(torch.float64)  # the same weights in another dtype: fine
    denoise(adacache.compile(half, fitted), lambda t: {k: v.double() if v.is_floating_point() else v for k, v in inputs(t).items()})

    other = FAMILIES["tiny_dit"]()[0]
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)  # same architecture and block names, other weights (another checkpoint)
    with pytest.raises(adacache.PolicyError, match="calibrated on another model") as info:
        adacache.compile(other, fitted)
    assert "adacache.calibrate" in str(info.value) and "calibrated_on=None" in str(info.value)
    adacache.compile(other, dataclasses.replace(fitted, calibrated_on=None))  # the user's explicit choice
    by_hand = adacache.AdaCorrection(base=adacache.FORA(interval=3), scales=dict(fitted.scales))
    adacache.compile(other, by_hand)  # scales given by hand carry no model: nothing to check


# -- 16. blocks that are not a plain stack ----------------------------------------------------

def test_a_unet_gets_a_clear_error_or_runs_on_the_blocks_named():
    # It used to raise an internal AssertionError ("cannot be outlined"); the residual-outside
    # loop (x = x + block(x)) now runs: tests/test_spans.py.
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(adacache.NotEligibleError, match="blocks="):
        adacache.compile(unet, adacache.FORA(interval=2))(x, torch.tensor([999.0, 999.0]))
    with pytest.raises(adacache.NotEligibleError, match="not a residual block"):
        adacache.compile(unet, adacache.FORA(interval=2), blocks="down_blocks.*")(x, torch.tensor([999.0, 999.0]))
    compiled = adacache.compile(unet, adacache.FORA(interval=2), blocks="down_blocks.*.resnets.*")
    with torch.no_grad():
        compiled.adacache.new_request(total_steps=3)
        for t in (999.0, 900.0, 800.0):
            out = compiled(x, torch.tensor([t, t])).sample
    assert torch.isfinite(out).all() and adacache.summary(compiled).hit_rate > 0


# -- issue 28: unclear errors made clear ---------------------------------------------------

def test_a_nan_timestep_in_every_row_gives_the_models_own_output(artifact):
    """It was reported as "rows carry different timesteps (nan ... nan)", in eager and in the
    engine; the README promises the model's own output for a non-finite input."""
    model, inputs, _ = FAMILIES["tiny_dit"]()
    compiled = adacache.compile(model, adacache.FORA(interval=3))
    engine = adacache.load(artifact, provider="cpu")
    nan = torch.tensor(float("nan"))
    with torch.no_grad():
        for t in (T0, torch.tensor(930.0)):  # step 1 reused; step 2 would reuse too
            compiled(**inputs(t))
            engine(**{k: v.numpy() for k, v in inputs(t).items()})
        got = compiled(**inputs(nan))
        want = model(**inputs(nan))
        from_engine = engine(**{k: v.numpy() for k, v in inputs(nan).items()})["output_0"]
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    assert np.isnan(from_engine).any() and from_engine.shape == tuple(want.shape)
    np.testing.assert_allclose(from_engine, want.numpy(), rtol=1e-4, atol=1e-5, equal_nan=True)


def test_pickling_a_compiled_pipeline_is_a_clear_type_error():
    pytest.importorskip("diffusers")
    import pickle

    from pipelines import shared

    with pytest.raises(TypeError, match="cannot be pickled.*adacache.uncompile"):
        pickle.dumps(adacache.compile(shared("flux").pipe, adacache.FORA(interval=2)))


def test_a_policy_changed_behind_its_frozen_fields_is_refused_at_compile():
    """It divided by zero at the first call."""
    model, _, _ = FAMILIES["tiny_dit"]()
    policy = adacache.FORA(interval=3)
    object.__setattr__(policy, "interval", 0)
    with pytest.raises(PolicyError, match="interval"):
        adacache.compile(model, policy)
