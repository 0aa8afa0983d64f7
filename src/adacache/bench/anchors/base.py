"""What every anchor adapter shares: the anchor setting, its error, and helpers that read a
diffusers ``DiTTransformer2DModel`` and put it back exactly after an anchor is removed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

DEFAULT_STEPS = 50
"""Denoising steps the sweeps are built for (the benchmark's default)."""

# DDPM linear beta schedule of the DiT paper (and of adacache's reference model).  Only SeaCache
# needs it, to express a DDPM timestep as the flow-matching sigma it expects, and the internal
# MagCache calibration sampler.
BETA_START, BETA_END, TRAIN_TIMESTEPS = 1e-4, 0.02, 1000

# Parameters that describe the run rather than the anchor's knob: left out of labels.
_LABEL_HIDDEN = frozenset({"num_inference_steps"})


class AnchorUnavailable(RuntimeError):
    """The anchor cannot run on this model; the message is the real reason (error text included)."""


@dataclass(frozen=True)
class AnchorConfig:
    """One anchor setting: which system, which method, which knob values.

    Attributes:
        system: ``"diffusers"`` or ``"cache-dit"``.
        method: e.g. ``"FirstBlockCache"``, ``"TaylorSeer"``, ``"MagCache"``,
            ``"PyramidAttentionBroadcast"``, ``"FasterCache"``, ``"SeaCache"``, ``"DBCache"``,
            ``"DBCache+TaylorSeer"`` (see :func:`supported_anchors`).
        params: the knob values, JSON-serialisable; missing knobs take the anchor's defaults.
    """

    system: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        # The generated hash would fail on the dict field; hash its canonical JSON instead.
        return hash((self.system, self.method, json.dumps(self.params, sort_keys=True)))

    def label(self) -> str:
        """Human-readable row name, e.g. ``"diffusers FirstBlockCache(threshold=0.1)"``."""
        knobs = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items() if k not in _LABEL_HIDDEN)
        return f"{self.system} {self.method}({knobs})"

    def with_params(self, **updates: Any) -> AnchorConfig:
        """A copy with some knob values replaced (e.g. a test's looser threshold)."""
        return AnchorConfig(self.system, self.method, {**self.params, **updates})


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise AnchorUnavailable(f"{type(model).__name__} has no `transformer_blocks` ModuleList to cache")
    return blocks


def null_class(model: nn.Module) -> int | None:
    """The class index DiT uses as the unconditional label (its label table's extra row)."""
    try:
        return int(model.transformer_blocks[0].norm1.emb.class_embedder.num_classes)
    except AttributeError:
        return None


def first_parameter(model: nn.Module) -> torch.Tensor | None:
    return next(iter(model.parameters()), None)


def timestep_value(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().flatten()[0].item()) if timestep.numel() else 0.0
    return float(timestep)


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(BETA_START, BETA_END, TRAIN_TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def sample_of(output: Any) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output[0]


def with_sample(output: Any, sample: torch.Tensor) -> Any:
    if hasattr(output, "sample"):
        output.sample = sample
        return output
    return (sample, *tuple(output)[1:])



class AttributeSnapshot:
    """Instance attributes (and registered children, parameters, buffers) of every submodule.

    Both systems leave traces after their own removal: diffusers keeps an empty
    ``_diffusers_hook`` registry and an instance-level ``forward``; cache-dit keeps its patched
    ``forward``, ``_is_patched`` and ``_norm1_emb`` (registered as a child module, so it even
    shows in ``named_modules``).  Dropping everything that was not there before puts the model
    back exactly, so the next anchor starts from the untouched class ``forward``.  The order of
    the registries is restored too: cache-dit swaps ``transformer_blocks`` with
    ``unittest.mock.patch.object`` around every forward, which re-inserts it at the end of
    ``_modules`` and so changes the order of ``named_modules()``, ``parameters()`` and the state dict.
    """

    _REGISTRIES = ("_modules", "_parameters", "_buffers")

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._before = [
            (m, frozenset(vars(m)), {r: list(getattr(m, r)) for r in self._REGISTRIES}) for m in model.modules()
        ]
        self._names = [name for name, _ in model.named_modules()]

    def restore(self) -> list[str]:
        dropped: list[str] = []
        for module, keys, registered in self._before:
            for key in set(vars(module)) - keys:
                # pop from __dict__ directly: nn.Module.__delattr__ is for params/buffers/children.
                module.__dict__.pop(key, None)
                dropped.append(f"{type(module).__name__}.{key}")
            for registry, names in registered.items():
                table = getattr(module, registry)
                for key in set(table) - set(names):
                    table.pop(key, None)
                    dropped.append(f"{type(module).__name__}.{key}")
                if list(table) != names:
                    # Re-insert in the original order, in place (the dict object is shared).
                    entries = [(key, table.pop(key)) for key in names if key in table]
                    table.update(entries)
        if [name for name, _ in self._model.named_modules()] != self._names:
            raise RuntimeError("the anchor changed the model's module tree and it could not be restored")
        return dropped
