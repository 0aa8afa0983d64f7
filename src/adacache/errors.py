"""Exceptions raised by adacache. Each one says what was wrong and what to do about it."""

from __future__ import annotations


def caller_stacklevel() -> int:
    """The ``stacklevel`` at which a warning raised by the calling function points at the
    first frame outside adacache and torch: the user's line (or their pipeline library's)."""
    import os
    import sys

    library = tuple(os.path.dirname(m.__file__) + os.sep for m in (sys.modules["adacache"], sys.modules.get("torch")) if m)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(library):
        frame, level = frame.f_back, level + 1
    return level


class AdaCacheError(Exception):
    """Base class of every error adacache raises on purpose."""


class NotEligibleError(AdaCacheError):
    """The model has no transformer blocks that adacache can cache."""


class CaptureError(AdaCacheError):
    """``torch.export`` could not capture the model on the given inputs.

    Where known: ``reason`` is the exporter's one-line diagnostic, ``source`` the model's
    line it could not trace (file, line, code), ``module`` the submodule running it (``""``
    for the model itself) and ``data_dependent`` whether the line reads a tensor's value.
    """

    reason: str | None = None
    source: object | None = None
    module: str | None = None
    data_dependent: bool = False


class CaptureFallbackWarning(UserWarning):
    """``torch.export`` could not capture the model whole, and ``capture="auto"`` runs it
    with ``capture="blocks"`` (its own code eagerly, each run of its blocks captured)."""


class PolicyError(AdaCacheError, ValueError):
    """A policy was built with invalid parameters or cannot be applied to this model."""


class SessionError(AdaCacheError):
    """The runtime was driven in a way it cannot serve (wrong inputs, misuse of a session)."""


class ExportError(AdaCacheError):
    """The cached model cannot be exported to the requested backend."""


class ArtifactError(AdaCacheError):
    """An exported artifact is missing, corrupt, incompatible, or fed wrong inputs."""


class InputError(AdaCacheError, TypeError):
    """An argument of an adacache function has the wrong form (for example ``example_inputs``
    that is not an ``(args, kwargs)`` pair). A TypeError, as Python raises for such mistakes."""


class RequestBoundaryWarning(UserWarning):
    """A compiled model runs where request boundaries can only be inferred from the timestep
    although an explicit boundary was at hand (a diffusers pipeline that is not compiled), or
    where a schedule needs the request's length and the request did not announce it."""


class TimestepWarning(UserWarning):
    """A compiled model was called without a timestep input adacache recognises, so each call
    counts as one denoising step (name it with ``adacache.compile(..., timestep_arg=...)``)."""
