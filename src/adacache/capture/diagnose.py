"""Turn an exporter failure into a :class:`~adacache.errors.CaptureError` that points at the cause.

``torch.export`` reports where *it* failed, deep inside its tracer; what a user can act on
is the line of the model that it could not trace. :func:`capture_error` finds that line
(the deepest frame of the traceback, or of the exceptions it was raised from, that is
neither torch's, adacache's nor the standard library's), the submodule that was running
it, and the kind of failure, and names the options that apply to that kind.
"""

from __future__ import annotations

import os
import sysconfig
import traceback
from dataclasses import dataclass
from pathlib import Path
import torch
from torch import nn

from ..errors import CaptureError

#: Code whose frames are never "the model's line": the exporter, adacache, the standard library.
_LIBRARY_DIRS = tuple(
    str(Path(p).resolve()) + os.sep
    for p in (Path(torch.__file__).parent, Path(__file__).parents[1], sysconfig.get_paths()["stdlib"])
)

#: Messages of failures caused by Python reading a tensor's *value* while tracing.
_DATA_DEPENDENT_WORDS = ("data-dependent", "data dependent", "symint", "symbool", "symfloat", "unbacked")


@dataclass(frozen=True)
class SourceLine:
    """A line of the model's code: file, line number and the code on it."""

    file: str
    line: int
    code: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}\n    {self.code}"


def model_source_line(exc: BaseException) -> SourceLine | None:
    """The deepest frame of the model's own code in ``exc``'s traceback, or in the tracebacks
    of the exceptions it was raised from (the exporter often re-raises)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = None
        for frame in traceback.extract_tb(current.__traceback__):
            if frame.filename.startswith("<"):
                continue  # generated code (FX, exec)
            if str(Path(frame.filename).resolve()).startswith(_LIBRARY_DIRS):
                continue
            found = SourceLine(frame.filename, frame.lineno or 0, (frame.line or "").strip())
        if found is not None:
            return found
        current = current.__cause__ or current.__context__
    return None


def is_data_dependent(exc: BaseException) -> bool:
    """Whether the failure is Python reading a tensor's value (``if x.sum() > 0``,
    ``.tolist()``, ``.item()`` in a shape, a loop over ``nonzero``): no input size avoids it."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    kinds = (GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, kinds) or any(w in str(current).lower() for w in _DATA_DEPENDENT_WORDS):
            return True
        current = current.__cause__ or current.__context__
    return False


def module_in_traceback(model: nn.Module, exc: BaseException) -> str | None:
    """The qualified name of the deepest submodule of ``model`` whose code raised ``exc``
    (``""`` for the model itself), or None when no frame belongs to one."""
    names = {id(m): name for name, m in model.named_modules()}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def capture_error(
    model: nn.Module,
    traced: nn.Module,
    inputs: str,
    exc: BaseException,
) -> CaptureError:
    """A CaptureError for ``exc``, raised while ``torch.export`` traced ``traced`` (``model``
    or a copy of it) on ``inputs`` (described): the model's line, the submodule running it,
    the inputs, the options that apply, then the exporter's own diagnostic."""
    module = module_in_traceback(traced, exc)
    where = type(model).__name__ + (f".{module}" if module else "")
    source = model_source_line(exc)
    diagnostic = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    reason = diagnostic.splitlines()[0] if diagnostic else type(exc).__name__
    data_dependent = is_data_dependent(exc)

    lines = [f"torch.export could not capture {where} on inputs ({inputs}): {reason}"]
    if source is not None:
        lines.append(f"  at {source}")
    lines.append("What applies:")
    lines.extend(f"  - {option}" for option in _options(data_dependent))
    lines.append(f"Exporter diagnostic:\n{diagnostic}")
    error = CaptureError("\n".join(lines))
    error.reason, error.source, error.module, error.data_dependent = reason, source, module, data_dependent
    return error


def _options(data_dependent: bool) -> list[str]:
    if data_dependent:
        return [
            "the line reads a tensor's value in Python (a branch, .item(), .tolist(), a loop over nonzero), which no "
            "input size avoids: rewrite it with tensor operations (torch.where, masks) or move it out of forward"
        ]
    return [
        "the failure may depend on the input shapes: compile with example_inputs= at the size you serve "
        "(adacache.compile(model, policy, example_inputs=(args, kwargs)) captures, and fails, at compile time)"
    ]
