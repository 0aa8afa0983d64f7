"""Check an artifact on the machine that serves it: ``adacache check ARTIFACT``. Torch-free.

``adacache.export`` runs what it wrote in ONNX Runtime next to the compiled model, for three
calls that go through both branches of every cache site (see
:mod:`adacache.backends.verify`), and keeps those calls in the artifact: each call's inputs
and the compiled model's outputs, in ``check.npz``. :func:`check_artifact` runs the same
calls with the ONNX Runtime, execution provider and model file found where it is run, and
compares every output (the model's, each cache tensor, each reuse signal) with the same
tolerance. It finds a model file damaged after export, an ONNX Runtime or provider that
computes differently from the one export checked with, and a folder whose files do not
belong together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError
from .manifest import check_file_inside, read_manifest

#: Allowed difference: ``|got - expected| <= ATOL + RTOL * max|expected|`` per output.
ATOL, RTOL = 1e-4, 1e-4

#: The file ``adacache.export`` keeps the checked calls in.
CHECK_FILE = "check.npz"


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check_artifact` ran: the artifact, the provider and the calls compared."""

    directory: Path
    provider: str
    calls: int
    outputs_per_call: int

    def __str__(self) -> str:
        return (f"{self.directory}: {self.calls} calls on {self.provider}, {self.outputs_per_call} outputs each, "
                f"all within {ATOL:g} + {RTOL:g} x max|expected| of what the compiled model computed at export")


def difference(want: np.ndarray, have: np.ndarray, atol: float = ATOL, rtol: float = RTOL) -> str | None:
    """None when ``have`` matches ``want`` (booleans exactly; numbers within ``atol + rtol *
    max|want|``, with non-finite values in the same places); otherwise what differs."""
    if want.shape != have.shape:
        return f"shape {list(have.shape)} instead of {list(want.shape)}"
    if want.dtype == np.bool_ or have.dtype == np.bool_:
        return None if np.array_equal(want.astype(bool), have.astype(bool)) else f"{have.tolist()} instead of {want.tolist()}"
    want64, have64 = want.astype(np.float64), have.astype(np.float64)
    finite = np.isfinite(want64)
    if not np.array_equal(finite, np.isfinite(have64)):
        bad = int((np.isfinite(have64) != finite).sum())
        return f"{bad} value(s) non-finite in one and finite in the other (NaN: {int(np.isnan(have64).sum())} here)"
    if not finite.any():
        return None
    scale = float(np.abs(want64[finite]).max())
    error = float(np.abs(want64[finite] - have64[finite]).max())
    return None if error <= atol + rtol * scale else f"max |difference| {error:.3g} (values up to {scale:.3g})"


def write_check_file(directory: Path, calls: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]) -> str:
    """Keep the checked calls (inputs and expected outputs by graph name) in the artifact."""
    arrays = {}
    for i, (inputs, outputs) in enumerate(calls):
        arrays.update({f"{i}.in.{name}": value for name, value in inputs.items()})
        arrays.update({f"{i}.out.{name}": value for name, value in outputs.items()})
    np.savez(directory / CHECK_FILE, **arrays)
    return CHECK_FILE


def check_artifact(directory: str | Path, provider: str = "cpu") -> CheckReport:
    """Run the calls ``adacache.export`` checked, with this machine's ONNX Runtime.

    Args:
        directory: an ONNX artifact folder (for a TensorRT artifact, its ``onnx`` subfolder).
        provider: ``cpu``, ``cuda``, ``tensorrt`` or ``auto`` (as :func:`adacache.load`).

    Raises:
        ArtifactError: the manifest or a file is invalid, the artifact holds no checked calls
            (exported with ``verify=False``), or an output differs: the first one is named.
    """
    import onnxruntime as ort

    from .onnx_engine import choose_providers

    root = Path(directory)
    manifest = read_manifest(root)
    if manifest.get("backend") != "onnx":
        raise ArtifactError(f"{root} is a {manifest.get('backend')} artifact; check its ONNX export, {root / 'onnx'}")
    name = manifest["verification"].get("check_file")
    if name is None:
        raise ArtifactError(
            f"{root} holds no checked calls: it was exported with verify=False (or by an adacache before 0.1's check "
            "file); re-export it with verification to check it here"
        )
    check_file_inside(root, root / "manifest.json", "verification.check_file", name)
    calls = _read_calls(root / name)
    model_file = root / manifest["model_file"]
    try:
        session = ort.InferenceSession(str(model_file), providers=choose_providers(provider, ort.get_available_providers()))
    except Exception as exc:  # noqa: BLE001 - any load failure is the finding
        raise ArtifactError(f"ONNX Runtime cannot load {model_file} ({type(exc).__name__}: {exc}); re-export it") from exc
    for i, (inputs, expected) in enumerate(calls):
        names = list(expected)
        try:
            got = session.run(names, inputs)
        except Exception as exc:  # noqa: BLE001 - a run failure is the finding
            raise ArtifactError(f"{model_file} fails on checked call {i} in ONNX Runtime: {exc}") from exc
        for output, have in zip(names, got):
            problem = difference(expected[output], np.asarray(have))
            if problem:
                raise ArtifactError(
                    f"{model_file}: output {output!r} of checked call {i} differs from what the compiled model computed at "
                    f"export ({problem}) on {session.get_providers()[0]}. The file changed since it was exported, or this "
                    "ONNX Runtime / provider computes differently: re-export it, or serve it where it checks"
                )
    return CheckReport(root, session.get_providers()[0], len(calls), len(calls[0][1]) if calls else 0)


def _read_calls(path: Path) -> list[tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """The calls in a check file; arrays only (``allow_pickle=False``: loading runs no code)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
        raise ArtifactError(f"{path} is not a check file adacache wrote ({type(exc).__name__}: {exc}); re-export the artifact") from exc
    calls: dict[int, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
    for key, value in arrays.items():
        index, kind, name = _parse_key(path, key)
        calls.setdefault(index, ({}, {}))[0 if kind == "in" else 1][name] = value
    if sorted(calls) != list(range(len(calls))) or not calls:
        raise ArtifactError(f"{path} holds calls {sorted(calls)}, not 0..n-1; re-export the artifact")
    return [calls[i] for i in range(len(calls))]


def _parse_key(path: Path, key: str) -> tuple[int, str, str]:
    index, _, rest = key.partition(".")
    kind, _, name = rest.partition(".")
    if not index.isdigit() or kind not in ("in", "out") or not name:
        raise ArtifactError(f"{path} holds {key!r}, which is not '<call>.in|out.<name>'; re-export the artifact")
    return int(index), kind, name
