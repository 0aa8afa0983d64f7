"""Check a written ONNX artifact against the compiled model before leaving it behind.

An exporter can write a file that loads and answers wrong: onnxscript's optimizer folds
``x + 1e-15`` into ``x`` (its constant matching has an absolute tolerance of 1e-8), so a
guarded division becomes 0/0; an invalid operator can make ONNX Runtime refuse the file. So
``adacache.export`` runs the artifact in ONNX Runtime next to the compiled model's own graph
on the example inputs, for three calls that go through both branches of every site:

1. every cache empty and reuse not allowed (the computing branch);
2. the caches of call 1 and reuse allowed (the reusing branch, where the site's gates agree);
3. the caches of call 2 and reuse not allowed again (a computation over warm caches).

Every output is compared (the model's outputs, each cache tensor, each signal), and the
first that differs is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..deploy.check import ATOL, RTOL, difference  # noqa: F401 - one tolerance for export and ``adacache check``

#: The three calls: (what it exercises, whether reuse is allowed).
CALLS = (("computing, empty caches", False), ("reusing", True), ("computing, warm caches", False))


@dataclass(frozen=True)
class Feeds:
    """What one call of the exported graph takes, in its input order, and its output names."""

    user: list[torch.Tensor]  # the tensor leaves ONNX sees
    all_leaves: list[Any]  # every leaf the torch graph takes (constants included)
    input_names: list[str]
    output_names: list[str]


def verify_onnx(model_file: Path, program: Any, feeds: Feeds, record: list[Any] | None = None) -> str | None:
    """None when ONNX Runtime computes what ``program.portable`` computes on three calls
    (see the module docstring); otherwise what differs, in a sentence. The reference is the
    portable graph (torch.cond as it is exported), run eagerly. ``record`` receives each
    call's inputs and the reference's outputs, by graph name (``adacache check`` reruns them)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure is the finding
        return f"ONNX Runtime cannot load it: {exc}"
    layout = program.layout
    # The compiled model runs where its example inputs are (a GPU model on the GPU); ONNX
    # Runtime runs on the CPU, fed copies.
    device = feeds.user[0].device if feeds.user else torch.device("cpu")
    states = program.initial_state(device)
    for what, allowed in CALLS:
        controls = _controls(layout, allowed, device)
        with torch.no_grad():
            expected = [_array(t) for t in program.portable(*feeds.all_leaves, *controls, *states)]
        arrays = [_array(t) for t in (*feeds.user, *controls, *states)]
        if record is not None:
            record.append((dict(zip(feeds.input_names, arrays)), dict(zip(feeds.output_names, expected))))
        try:
            got = session.run(feeds.output_names, dict(zip(feeds.input_names, arrays)))
        except Exception as exc:  # noqa: BLE001 - a run failure is the finding
            return f"ONNX Runtime fails on the {what} call: {exc}"
        for name, want, have in zip(feeds.output_names, expected, got):
            problem = difference(want, np.asarray(have), ATOL, RTOL)
            if problem:
                return f"output {name!r} of the {what} call differs from the compiled model's: {problem}"
        n_user = layout.num_user_outputs
        states = [torch.from_numpy(np.array(a)).to(device) for a in got[n_user : n_user + len(layout.states)]]
    return None


def _controls(layout: Any, allowed: bool, device: torch.device) -> list[torch.Tensor]:
    """The step's controls: the reuse flag of each site, and forecast coefficients that
    reuse ``D_0`` with a first-order term (so a forecast reads more than one stored tensor)."""
    order = layout.forecast_order
    controls = []
    for spec in layout.controls:
        if spec.kind == "allow":
            controls.append(torch.tensor(allowed, device=device))
        else:
            values = torch.zeros(order + 1, device=device)
            values[: min(order, 1) + 1] = 1.0
            controls.append(values)
    return controls


def _array(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
