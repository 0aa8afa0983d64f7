"""A stand-in for a compiled model during a calibration run: it passes every call through,
keeps what the run needs, and answers attribute reads as the model does (a pipeline reads
``transformer.config``, ``dtype``, ...). Policies that fit parameters subclass it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class OutputRecorder(nn.Module):
    """Passes calls through to the cached model and keeps each call's main output tensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.outputs: list[torch.Tensor] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        leaf = out if isinstance(out, torch.Tensor) else (out[0] if isinstance(out, (tuple, list)) else out.sample)
        self.outputs.append(leaf.detach().float().clone())
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)
