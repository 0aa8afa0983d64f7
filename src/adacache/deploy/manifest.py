"""The manifest of an exported artifact: plain JSON, validated on load, never executed.

Validation has two layers: ``manifest.schema.json`` (shipped with the package, usable from any
language) fixes every field's type and range, and :func:`check_manifest` adds what a schema
cannot say: that the fields agree with each other (a state is fed by an input of its shape,
a control names a scheduled site, ...) and that the files they name lie inside the artifact.
The engines then compare the manifest's inputs with what the model file itself declares.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ArtifactError

FORMAT = "adacache-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SCHEMA_NAME = "manifest.schema.json"

_REEXPORT = "the artifact is corrupt or was edited by hand; re-export it with adacache.export"


@functools.cache
def manifest_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) every manifest adacache writes satisfies."""
    return json.loads(resources.files(__package__).joinpath(SCHEMA_NAME).read_text())


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load ``<directory>/manifest.json`` and check it (:func:`check_manifest`).

    Raises:
        ArtifactError: the folder or manifest is missing, the JSON is corrupt, the artifact was
            written by an incompatible format version, or a field is outside the schema or
            disagrees with another (the message names each such field).
    """
    root = Path(directory)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"no artifact folder at {root}; export one with adacache.export(model, '{root}', ...)")
    if not path.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST_NAME}: it is not an adacache artifact (re-export it)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the artifact is corrupt, re-export it") from exc
    check_manifest(manifest, root)
    return manifest


def check_manifest(manifest: Any, directory: str | Path) -> None:
    """Check a loaded manifest against the schema, its own cross-references and its folder.

    Raises:
        ArtifactError: naming every field that is wrong (``schedules.site_0.interval: 0 is
            less than the minimum of 1``), or the format version when it is not this one.
    """
    root = Path(directory)
    where = root / MANIFEST_NAME
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where} must hold a JSON object; {_REEXPORT}")
    if manifest.get("format") != FORMAT and "format" in manifest:
        raise ArtifactError(f"{where} has format {manifest['format']!r}, expected {FORMAT!r}: it is not an adacache artifact")
    version = manifest.get("format_version")
    if version is not None and type(version) is not int:  # "1" would read as the same version
        raise ArtifactError(
            f"{where}: format_version is {version!r} ({type(version).__name__}), but it must be the integer "
            f"{FORMAT_VERSION}; {_REEXPORT}"
        )
    if version is not None and version != FORMAT_VERSION:
        raise ArtifactError(
            f"{where} was written with artifact format version {version}, this adacache reads "
            f"version {FORMAT_VERSION}; re-export it with this version of adacache"
        )
    problems = list(_schema_problems(manifest)) or list(_reference_problems(manifest))
    problems += list(_non_finite_numbers(manifest))
    if problems:
        listed = "\n  ".join(problems)
        raise ArtifactError(f"{where} is not a valid manifest ({_REEXPORT}):\n  {listed}")
    for field in ("model_file", "onnx_file"):
        if field in manifest:
            check_file_inside(root, where, field, manifest[field])
    if "check_file" in manifest.get("verification", {}):
        check_file_inside(root, where, "verification.check_file", manifest["verification"]["check_file"])


def _field(path: Any) -> str:
    return ".".join(str(p) for p in path) or "(the manifest)"


def _schema_problems(manifest: dict[str, Any]) -> Iterator[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(manifest_schema())
    for error in sorted(validator.iter_errors(manifest), key=lambda e: [str(p) for p in e.absolute_path]):
        path = list(error.absolute_path)
        if error.validator == "required":
            missing = [k for k in error.validator_value if k not in error.instance]
            for key in missing:
                yield f"{_field([*path, key])}: is missing"
        elif error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = error.schema.get("properties", {})
            for key in sorted(set(error.instance) - set(known)):
                yield f"{_field([*path, key])}: is not a field of this format"
        else:
            yield f"{_field(path)}: {error.message}"


def _reference_problems(manifest: dict[str, Any]) -> Iterator[str]:
    """What the schema cannot say: the fields agree with each other (the engines rely on it)."""
    inputs = {spec["name"]: (i, spec) for i, spec in enumerate(manifest["inputs"])}
    outputs = {spec["name"]: spec for spec in manifest["outputs"]}
    if len(inputs) != len(manifest["inputs"]):
        yield "inputs: names repeat"
    if len(outputs) != len(manifest["outputs"]):
        yield "outputs: names repeat"
    sites = {s["name"] for s in manifest.get("sites", [])}
    schedules = manifest["schedules"]

    state_inputs = [spec["name"] for spec in manifest["inputs"] if spec["role"] == "state"]
    state_outputs = [spec["name"] for spec in manifest["outputs"] if spec["role"] == "state"]
    # The engines pair states with graph inputs and outputs by position.
    if not len(manifest["states"]) == len(state_inputs) == len(state_outputs):
        yield (f"states: {len(manifest['states'])} states, but {len(state_inputs)} state inputs and "
               f"{len(state_outputs)} state outputs")
    for i, (state, name, output) in enumerate(zip(manifest["states"], state_inputs, state_outputs)):
        if state["name"] != name:
            yield f"states.{i}.name: {state['name']!r} is not the state input at this position ({name!r})"
        if state["output"] != output:
            yield f"states.{i}.output: {state['output']!r} is not the state output at this position ({output!r})"
    for i, state in enumerate(manifest["states"]):
        _, spec = inputs.get(state["name"], (None, None))
        if spec is None:
            continue  # reported above
        for key in ("shape", "dtype"):
            if state[key] != spec[key]:
                yield f"states.{i}.{key}: {state[key]!r} differs from the {key} of its input '{state['name']}' ({spec[key]!r})"

    for i, control in enumerate(manifest["controls"]):
        if control["site"] not in schedules:
            yield f"controls.{i}.site: {control['site']!r} has no schedule (scheduled sites: {sorted(schedules)})"
        if inputs.get(control["name"], (None, {}))[1].get("role") != "control":
            yield f"controls.{i}.name: {control['name']!r} is not a control input"
    forecast = manifest.get("forecast")
    if forecast:
        for key in ("coef", "update"):
            if inputs.get(forecast[key], (None, {}))[1].get("role") != "control":
                yield f"forecast.{key}: {forecast[key]!r} is not a control input"
        if forecast["schedule_of"] not in schedules:
            yield f"forecast.schedule_of: {forecast['schedule_of']!r} has no schedule"
        # One coefficient per stored difference: the graph's control inputs fix the order.
        for key in ("coef", "update"):
            spec = inputs.get(forecast[key], (None, {}))[1]
            if spec.get("role") == "control" and spec.get("shape") != [forecast["order"] + 1]:
                yield (f"forecast.order: {forecast['order']} needs {forecast['order'] + 1} coefficients, but the control "
                       f"input '{forecast[key]}' holds {spec.get('shape')}")
    for i, signal in enumerate(manifest["signals"]):
        if outputs.get(signal["name"], {}).get("role") != "signal":
            yield f"signals.{i}.name: {signal['name']!r} is not a signal output"
        if sites and signal["site"] not in sites:
            yield f"signals.{i}.site: {signal['site']!r} is not a site of this artifact"
    if sites:
        for name in sorted(set(schedules) - sites):
            yield f"schedules.{name}: is not a site of this artifact"
        for i, site in enumerate(manifest["sites"]):
            if site.get("gated_by") is not None and site["gated_by"] not in sites:
                yield f"sites.{i}.gated_by: {site['gated_by']!r} is not a site of this artifact"
            # 'after_warmup' hands every decision after the warmup to a gate inside the graph
            # (a probe's threshold); on a site without one the engine would reuse the same
            # features at every later step.
            schedule = schedules.get(site["name"], {})
            if schedule.get("kind") == "after_warmup" and site.get("gated_by") is None and site.get("threshold") is None:
                yield (f"schedules.{site['name']}.kind: 'after_warmup' leaves each step's decision to an in-graph gate, "
                       f"but site {site['name']!r} has none (no gated_by, no threshold): it would reuse at every step")
    timestep = manifest.get("timestep_input")
    if timestep is not None and inputs.get(timestep, (None, {}))[1].get("role") != "user":
        users = [n for n, (_, s) in inputs.items() if s["role"] == "user"]
        yield f"timestep_input: {timestep!r} is not one of the user inputs {users}"
    user_indices = sorted(o["index"] for o in manifest["outputs"] if o["role"] == "user")
    if user_indices != list(range(len(user_indices))):
        yield f"outputs: the user outputs' indices {user_indices} are not 0, 1, ..."


def _non_finite_numbers(node: Any, path: tuple[Any, ...] = ()) -> Iterator[str]:
    # json reads NaN / Infinity although JSON has no such values; no manifest field may hold one.
    if isinstance(node, float) and not math.isfinite(node):
        yield f"{_field(path)}: {node} is not a finite number"
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _non_finite_numbers(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _non_finite_numbers(value, (*path, i))


def check_file_inside(root: Path, where: Path, field: str, name: str) -> None:
    """Refuse a file name that leaves the artifact folder or names a missing file."""
    target = root / name
    # Resolved (links followed) before the check: an artifact only ever names its own files,
    # so a manifest pointing elsewhere (``..``, an absolute path, a link out) is refused.
    if not target.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(
            f"{where}: {field} {name!r} lies outside the artifact folder {root}; "
            "an artifact must hold its own files (re-export it)"
        )
    if not target.is_file():
        raise ArtifactError(f"{where}: {field} names {name!r}, which is missing from {root}")


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` as ``<directory>/manifest.json``."""
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path
