"""Serving exported artifacts. Importing this package does not import torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .check import CheckReport, check_artifact
from .manifest import read_manifest


def load(directory: str | Path, provider: str = "auto", session_options: Any = None) -> Any:
    """Load an artifact written by ``adacache.export``.

    Args:
        directory: the artifact folder (``manifest.json`` + model file).
        provider: ``auto`` (TensorRT EP, then CUDA EP, then CPU), ``cpu``, ``cuda``,
            ``tensorrt`` (ONNX Runtime execution providers), or ``tensorrt-engine`` to run a
            serialized TensorRT engine built by ``adacache.export(..., format="tensorrt")``.
        session_options: an ``onnxruntime.SessionOptions`` (threads, graph optimisation level).

    Returns:
        An engine: call it with the model's inputs as arrays, by name.
    """
    if provider == "tensorrt-engine" or read_manifest(directory).get("backend") == "tensorrt":
        from .tensorrt_engine import TensorRTEngine

        return TensorRTEngine(directory)
    from .onnx_engine import OnnxEngine

    return OnnxEngine(directory, provider=provider, session_options=session_options)


__all__ = ["CheckReport", "check_artifact", "load", "read_manifest"]
