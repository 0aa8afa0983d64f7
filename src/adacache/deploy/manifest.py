"""The manifest of an exported artifact: plain JSON, validated on load, never executed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ArtifactError

FORMAT = "adacache-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

_REQUIRED = ("format", "format_version", "model_file", "inputs", "outputs", "states", "controls", "signals", "policy", "schedules")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load and check ``<directory>/manifest.json``.

    Raises:
        ArtifactError: the folder or manifest is missing, the JSON is corrupt, fields are
            missing, or the artifact was written by an incompatible format version.
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
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} must hold a JSON object")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise ArtifactError(f"{path} lacks the fields {missing}; the artifact is corrupt or not an adacache artifact")
    if manifest["format"] != FORMAT:
        raise ArtifactError(f"{path} has format {manifest['format']!r}, expected {FORMAT!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} was written with artifact format version {manifest['format_version']}, this adacache reads "
            f"version {FORMAT_VERSION}; re-export it with this version of adacache"
        )
    if not isinstance(manifest["model_file"], str) or not manifest["model_file"]:
        raise ArtifactError(f"{path}: model_file must be a file name inside the artifact folder, got {manifest['model_file']!r}")
    model_file = root / manifest["model_file"]
    # Resolved (links followed) before the check: an artifact only ever names its own files,
    # so a manifest pointing elsewhere (``..``, an absolute path, a link out) is refused.
    if not model_file.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(
            f"{path}: model_file {manifest['model_file']!r} lies outside the artifact folder {root}; "
            "an artifact must hold its own model file (re-export it)"
        )
    if not model_file.is_file():
        raise ArtifactError(f"{path} names model file {manifest['model_file']!r}, which is missing from {root}")
    return manifest


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` as ``<directory>/manifest.json``."""
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path
