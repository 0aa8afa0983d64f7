"""``adacache check ARTIFACT``: the calls an export checked, rerun where the artifact is served."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

import adacache  # noqa: E402
from adacache.cli import main  # noqa: E402
from families import FAMILIES  # noqa: E402


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    path = tmp_path_factory.mktemp("check") / "fora"
    adacache.export(adacache.compile(model, adacache.TaylorSeer(order=1, interval=2)), path,
                    example_inputs=((), inputs(torch.tensor(500.0))))
    return path


def _copy(artifact, tmp_path):
    return shutil.copytree(artifact, tmp_path / "copy")


def test_an_exported_artifact_checks_on_the_command_line(artifact, capsys):
    assert main(["check", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "3 calls on CPUExecutionProvider" in out
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["verification"]["check_file"] == "check.npz"
    report = adacache.check_artifact(artifact)
    assert report.calls == 3 and report.outputs_per_call == len(manifest["outputs"])


def test_a_model_file_changed_after_export_fails_the_check(artifact, tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    copy = _copy(artifact, tmp_path)
    model = onnx.load(str(copy / "model.onnx"))
    weight = max((t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT), key=lambda t: np.prod(t.dims))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 0.5, weight.name))
    onnx.save(model, str(copy / "model.onnx"))
    with pytest.raises(adacache.ArtifactError, match="output 'output_0' of checked call 0 differs"):
        adacache.check_artifact(copy)
    assert main(["check", str(copy)]) == 1
    assert "differs from what the compiled model computed at export" in capsys.readouterr().err


def test_an_artifact_exported_without_verification_says_it_cannot_be_checked(tmp_path):
    model, inputs, _ = FAMILIES["tiny_dit"]()
    adacache.export(adacache.compile(model, adacache.FORA(interval=2)), tmp_path / "a",
                    example_inputs=((), inputs(torch.tensor(500.0))), verify=False)
    assert not (tmp_path / "a" / "check.npz").exists()
    with pytest.raises(adacache.ArtifactError, match="exported with verify=False"):
        adacache.check_artifact(tmp_path / "a")


class _Payload:
    """Pickled into an object array: unpickling it would write a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_check_file_holding_objects_is_refused_without_running_them(artifact, tmp_path):
    copy = _copy(artifact, tmp_path)
    marker = tmp_path / "ran"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(str(marker))
    np.savez(copy / "check.npz", **{"0.in.x": payload, "0.out.output_0": np.zeros(1)})
    with pytest.raises(adacache.ArtifactError, match="not a check file adacache wrote"):
        adacache.check_artifact(copy)
    assert not marker.exists(), "loading the check file ran code from it"


def test_a_manifest_naming_a_check_file_outside_its_folder_is_refused(artifact, tmp_path):
    copy = _copy(artifact, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["verification"]["check_file"] = "../elsewhere.npz"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(adacache.ArtifactError, match="lies outside the artifact folder"):
        adacache.check_artifact(copy)
    with pytest.raises(adacache.ArtifactError, match="lies outside the artifact folder"):
        adacache.load(copy, provider="cpu")
