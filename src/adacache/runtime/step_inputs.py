"""What the host feeds a program at each call beside the model's own inputs: the call's
timestep (read from the inputs, to place the call in its request) and the controls of the
policy's schedule (reuse-allowed flags, forecast coefficients), in the layout's order."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import stepping
from ..errors import InputError, PolicyError, SessionError, TimestepWarning
from ..policies.base import Policy, StepContext

if TYPE_CHECKING:
    from .program import Program

#: The input names read as the timestep unless ``timestep_arg`` names another.
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas")


class StepInputs:
    """Reads each call's timestep and makes the step's controls for ``policy``."""

    def __init__(self, model: nn.Module, policy: Policy, timestep_arg: str | None = None) -> None:
        self.model_name = type(model).__name__
        self.policy = policy
        self.timestep_arg = checked_timestep_arg(model, timestep_arg)
        #: The input names read as the call's timestep: the one named at compile, or the usual ones.
        self.timestep_names: tuple[str, ...] = (timestep_arg,) if timestep_arg else TIMESTEP_NAMES
        self._timestep_index = _positional_index(model, self.timestep_names)
        self._warned_no_timestep = False
        self._flags: dict[tuple[bool, torch.device], torch.Tensor] = {}
        self._forecast: dict[tuple[int, int, int | None, torch.device], list[torch.Tensor]] = {}

    # -- the timestep -------------------------------------------------------------------
    def timestep(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
        """The call's timestep as a Python number (one per call: rows must agree)."""
        value = next((kwargs[n] for n in self.timestep_names if n in kwargs), None)
        if value is None and self._timestep_index is not None and len(args) > self._timestep_index:
            value = args[self._timestep_index]
        if value is None:
            self._warn_no_timestep()
            return None
        if isinstance(value, torch.Tensor):
            if value.numel() <= 1:
                if not value.numel():
                    return None
                low = high = float(value)
            else:
                low_t, high_t = value.detach().reshape(-1).aminmax()
                low, high = float(low_t), float(high_t)  # the aminmax above is one kernel; these read it
            return stepping.call_timestep(low, high, SessionError)
        # A number is part of the input signature by value (torch.export specialises on it):
        # every step would capture a new graph and reuse nothing. Refused with what to pass.
        raise InputError(
            f"the timestep input is a {type(value).__name__} ({value!r}), not a tensor: adacache captures one graph per "
            "input signature, which includes non-tensor values, so every step would capture a new graph and nothing "
            f"would be reused. Pass it as a tensor: torch.tensor({value!r}) or torch.full((batch,), {value!r})"
        )

    def _warn_no_timestep(self) -> None:
        """Once per model: without a timestep each call is a step, so the two calls of a CFG
        pair are two steps and the second reuses the first's features."""
        if self._warned_no_timestep:
            return
        self._warned_no_timestep = True
        names = ", ".join(self.timestep_names)
        warnings.warn(
            f"{self.model_name} was called without a timestep input adacache recognises (looked for: {names}), "
            "so each call counts as one denoising step: classifier-free guidance run as two calls would have the second "
            "call reuse the first one's features, and requests are only told apart by explicit boundaries. Name the "
            "input that carries the timestep: adacache.compile(model, policy, timestep_arg='noise_level')",
            TimestepWarning,
            stacklevel=4,
        )

    # -- the controls -------------------------------------------------------------------
    def controls(self, program: "Program", ctx: StepContext, device: torch.device) -> list[torch.Tensor]:
        """The host-side inputs of one step, in the layout's order: the forecast coefficients
        (TaylorSeer), then one reuse-allowed flag per cached site."""
        controls: list[torch.Tensor] = []
        sites = program.cached_sites
        if program.layout.forecast_order:
            key = (ctx.step, ctx.fresh_from, ctx.total_steps, device)
            cached = self._forecast.get(key)
            if cached is None:
                schedule = self.policy.schedule(sites[0])
                coef, update = stepping.forecast_controls(schedule, ctx.step, program.layout.forecast_order, ctx.fresh_from,
                                                          ctx.total_steps, self.policy.forecast_basis())
                cached = self._forecast[key] = [torch.tensor(coef, device=device), torch.tensor(update, device=device)]
            controls += cached
        controls += [self.flag(self.policy.allow_reuse(ctx, site), device) for site in sites]
        return controls

    def replay_controls(self, program: "Program", device: torch.device) -> list[torch.Tensor]:
        """Controls under which every cached site reuses its cache as given: each flag set,
        a forecast that returns its stored value (coefficients 1, 0, 0, ...) and updates nothing."""
        controls = []
        order = program.layout.forecast_order
        for spec in program.layout.controls:
            if spec.kind == "forecast_coef":
                controls.append(torch.zeros(order + 1, device=device).index_fill_(0, torch.tensor([0], device=device), 1.0))
            elif spec.kind == "forecast_update":
                controls.append(torch.zeros(order + 1, device=device))
            else:
                controls.append(self.flag(True, device))
        return controls

    def flag(self, value: bool, device: torch.device) -> torch.Tensor:
        """Cached 0-d bool tensors, so a schedule costs no host-to-device copy per step."""
        key = (bool(value), device)
        flag = self._flags.get(key)
        if flag is None:
            flag = self._flags[key] = torch.tensor(bool(value), device=device)
        return flag


def checked_timestep_arg(model: nn.Module, name: str | None) -> str | None:
    """``name`` when it is an input of ``model.forward`` (or forward takes ``**kwargs``)."""
    if name is None:
        return None
    if not isinstance(name, str) or not name.isidentifier():
        raise PolicyError(f"timestep_arg must be the name of the model's timestep input, got {name!r}")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return name
    if name in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return name
    raise PolicyError(
        f"timestep_arg={name!r} is not an input of {type(model).__name__}.forward (its inputs: {', '.join(params)}); "
        "name the input that carries the denoising timestep or noise level"
    )


def _positional_index(model: nn.Module, names: Sequence[str]) -> int | None:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.name in names and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return i
    return None
