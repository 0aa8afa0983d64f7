"""``CachedModule``: the drop-in replacement that ``adacache.compile`` returns."""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..capture import InputSignature, signature_of
from .. import stepping
from ..policies.base import Policy, StepContext
from .program import Program, build_program
from .session import Session
from .stats import SessionStats

TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas")


class CachedModule(nn.Module):
    """A model whose transformer blocks are cached by a policy.

    Call it exactly like the wrapped model; it returns the same output type. The cached
    graphs are captured lazily, once per input signature, and shared by every session;
    the cache tensors live in sessions (one per thread by default, or one per
    ``with adacache.session(model):`` block).
    """

    def __init__(
        self,
        model: nn.Module,
        policy: Policy,
        *,
        blocks: str | Sequence[str] | None = None,
        backend: str = "eager",
        max_programs: int = 8,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"adacache.compile expects a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be an adacache policy (FORA, FirstBlockCache, ...), got {type(policy).__name__}")
        if backend not in policy.backends:
            raise ValueError(f"{type(policy).__name__} cannot run on backend {backend!r}; it supports {policy.backends}")
        self.model = model
        self.policy = policy
        self.blocks = blocks
        self.backend = backend
        self.max_programs = max_programs
        self._programs: OrderedDict[InputSignature, Program] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._flags: dict[tuple[bool, torch.device], torch.Tensor] = {}
        self._forecast: dict[tuple[int, torch.device], list[torch.Tensor]] = {}
        self._timestep_index = _positional_index(model, TIMESTEP_NAMES)

    # -- nn.Module behaviour ----------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current_session().call(args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Pipelines read attributes such as ``config`` or ``dtype`` off the denoiser.
            return getattr(super().__getattr__("model"), name)

    # -- sessions ---------------------------------------------------------------------
    def _stack(self) -> list[Session]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = [Session(self)]
        return stack

    def current_session(self) -> Session:
        """The session this thread's calls use: the innermost ``adacache.session`` block, or
        this thread's default one."""
        return self._stack()[-1]

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A fresh session for the duration of a ``with`` block (one request)."""
        sess = Session(self)
        stack = self._stack()
        stack.append(sess)
        try:
            yield sess
        finally:
            stack.remove(sess)
            sess.stats.close_generation()

    def reset(self) -> None:
        """Start a new generation in this thread's current session."""
        self.current_session().reset()

    # -- programs ---------------------------------------------------------------------
    def _program_for(self, args: tuple[Any, ...], kwargs: dict[str, Any], stats: SessionStats) -> tuple[Program, InputSignature]:
        signature = signature_of(args, kwargs)
        program = self._programs.get(signature)
        if program is None:
            with self._lock:
                program = self._programs.get(signature)
                if program is None:
                    program = build_program(self.model, self.policy, args, kwargs, blocks=self.blocks, backend=self.backend)
                    self._programs[signature] = program
                    stats.captures += 1
                    while len(self._programs) > self.max_programs:
                        self._programs.popitem(last=False)
        return program, signature

    def prepare(self, *args: Any, **kwargs: Any) -> Program:
        """Capture and rewrite for these example inputs now instead of at the first call."""
        return self._program_for(args, kwargs, self.current_session().stats)[0]

    @property
    def programs(self) -> list[Program]:
        """The programs captured so far, oldest first."""
        return list(self._programs.values())

    def _timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
        value = next((kwargs[n] for n in TIMESTEP_NAMES if n in kwargs), None)
        if value is None and self._timestep_index is not None and len(args) > self._timestep_index:
            value = args[self._timestep_index]
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            return float(value.reshape(-1)[0]) if value.numel() else None
        return float(value)

    def _controls(self, program: Program, ctx: StepContext, device: torch.device) -> list[torch.Tensor]:
        """The host-side inputs of one step, in the layout's order: the forecast coefficients
        (TaylorSeer), then one reuse-allowed flag per cached site."""
        controls: list[torch.Tensor] = []
        sites = program.cached_sites
        if program.layout.forecast_order:
            key = (ctx.step, device)
            cached = self._forecast.get(key)
            if cached is None:
                coef, update = stepping.forecast_controls(self.policy.schedule(sites[0]), ctx.step, program.layout.forecast_order)
                cached = self._forecast[key] = [torch.tensor(coef, device=device), torch.tensor(update, device=device)]
            controls += cached
        controls += [self._flag(self.policy.allow_reuse(ctx, site), device) for site in sites]
        return controls

    def _flag(self, value: bool, device: torch.device) -> torch.Tensor:
        """Cached 0-d bool tensors, so a schedule costs no host-to-device copy per step."""
        key = (bool(value), device)
        flag = self._flags.get(key)
        if flag is None:
            flag = self._flags[key] = torch.tensor(bool(value), device=device)
        return flag


def _positional_index(model: nn.Module, names: Sequence[str]) -> int | None:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.name in names and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return i
    return None
