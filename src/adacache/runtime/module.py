"""What ``adacache.compile`` returns for a model, and the runtime behind it.

The compiled model is **the user's model object, seen through a subclass of its own class**
(:func:`compiled_view`): a second instance that shares the model's attribute dictionary
(same parameters, submodules, adapters, processors, config) and whose ``forward`` runs the
cached program. Why this shape, measured against the alternatives on diffusers 0.42:

* diffusers' LoRA machinery at pipeline level (``fuse_lora``, ``unload_lora_weights``,
  ``set_adapters``, ...) acts only on components that are ``ModelMixin`` instances, and
  PEFT writes its state (``peft_config``, adapter layers) onto the object it is given. A
  wrapper module (what ``adacache.compile`` returned before) is neither: LoRA calls through it
  were skipped or landed on the wrapper. The view *is* a ``ModelMixin`` of the same class,
  and everything written through it is written to the model.
* Replacing ``forward`` on the user's object in place would change the model the user holds
  (an uncached reference model, or two policies on the same weights in one benchmark, would
  be impossible); the view leaves the original object's class and behaviour alone, as
  ``torch.compile`` does.

The runtime (:class:`Runtime`, reached as ``compiled.adacache``) owns the programs (one per
input signature, each guarded by a fingerprint of the model it was captured from) and the
sessions (per-request cache state, one per thread unless entered explicitly).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import stepping
from ..capture import InputSignature, signature_of
from ..errors import InputError, PolicyError, RequestBoundaryWarning, SessionError, TimestepWarning
from ..policies.base import Policy, StepContext
from . import guards
from .program import Program, build_program
from .session import Session
from .stats import SessionStats

TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas")


@dataclass(frozen=True)
class Recapture:
    """A program captured again because the model changed under it."""

    signature: str
    reason: str


class Runtime:
    """The state behind a compiled model: policy, guarded programs and sessions.

    Reach it as ``compiled.adacache``. ``model`` is the plain model (the user's object, of
    its own class), which is what gets captured.
    """

    def __init__(
        self,
        model: nn.Module,
        policy: Policy,
        *,
        blocks: str | Sequence[str] | None = None,
        backend: str = "eager",
        max_programs: int = 8,
        timestep_arg: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"adacache.compile expects a torch.nn.Module or a diffusers pipeline, got {type(model).__name__}")
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be an adacache policy (FORA, FirstBlockCache, ...), got {type(policy).__name__}")
        if backend not in policy.backends:
            raise ValueError(f"{type(policy).__name__} cannot run on backend {backend!r}; it supports {policy.backends}")
        policy.check_parameters()
        policy.check_model(model)
        guards.install_registration_hooks()
        self.model = model
        self.policy = policy
        self.blocks = blocks
        self.backend = backend
        self.max_programs = max_programs
        self.recaptures: list[Recapture] = []
        self._programs: OrderedDict[InputSignature, Program] = OrderedDict()
        self._lock = threading.RLock()
        self._local = threading.local()
        self._flags: dict[tuple[bool, torch.device], torch.Tensor] = {}
        self._forecast: dict[tuple[int, torch.device], list[torch.Tensor]] = {}
        self.timestep_arg = _checked_timestep_arg(model, timestep_arg)
        #: The input names read as the call's timestep: the one named at compile, or the usual ones.
        self.timestep_names: tuple[str, ...] = (timestep_arg,) if timestep_arg else TIMESTEP_NAMES
        self._timestep_index = _positional_index(model, self.timestep_names)
        self._warned_plain_pipeline = False
        self._warned_no_timestep = False

    # -- sessions ---------------------------------------------------------------------
    def _stack(self) -> list[Session]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = [Session(self)]
        return stack

    def current_session(self) -> Session:
        """The session this thread's calls use: the innermost ``adacache.session`` block (or
        pipeline call), or this thread's default one."""
        return self._stack()[-1]

    def latest_session(self) -> Session:
        """The session of this thread's latest call (a finished pipeline call's included)."""
        return getattr(self._local, "latest", None) or self.current_session()

    @contextlib.contextmanager
    def session(self, total_steps: Any = None) -> Iterator[Session]:
        """A fresh session for the duration of a ``with`` block; its first call starts a request."""
        sess = Session(self)
        sess.begin_request(total_steps)
        stack = self._stack()
        stack.append(sess)
        try:
            yield sess
        finally:
            stack.remove(sess)  # its records stay readable: adacache.summary shows this request

    def reset(self) -> None:
        """Start a new request at the next call of this thread's current session."""
        self.current_session().reset()

    def new_request(self, total_steps: int | None = None) -> None:
        """The next call of this thread's current session starts a new request (same as
        :meth:`reset`; ``total_steps`` tells policies how many steps it will run)."""
        self.current_session().begin_request(total_steps)

    def warn_if_inside_a_plain_pipeline(self) -> None:
        """Warn (once) when this model is called from a diffusers pipeline that is not
        compiled: its requests are then inferred, though the pipeline call could mark them."""
        if self._warned_plain_pipeline:
            return
        from .pipeline import is_compiled_pipeline, is_pipeline

        frame = sys._getframe(1)
        for _ in range(48):  # a pipeline's __call__ is a few frames up (module __call__, hooks)
            if frame is None:
                return
            if frame.f_code.co_name == "__call__":
                owner = frame.f_locals.get("self")
                if is_pipeline(owner) and not is_compiled_pipeline(owner):
                    self._warned_plain_pipeline = True
                    warnings.warn(
                        f"this adacache-compiled {type(self.model).__name__} runs inside {type(owner).__name__}.__call__, "
                        "but the pipeline is not compiled, so each request is inferred from the timestep, which cannot "
                        "tell a request that continues an interrupted one's schedule (image-to-image after a cancelled "
                        "text-to-image) from its next step. Compile the pipeline: pipe = adacache.compile(pipe, policy) "
                        "(it keeps this compiled model and its captures), or call model.adacache.new_request() before each request.",
                        RequestBoundaryWarning,
                        stacklevel=2,
                    )
                    return
            frame = frame.f_back

    # -- calls --------------------------------------------------------------------------
    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run one model call in this thread's current session."""
        session = self._local.latest = self.current_session()
        return session.call(args, kwargs)

    # -- programs ---------------------------------------------------------------------
    def program_for(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], stats: SessionStats, *, check_model: bool = True
    ) -> tuple[Program, InputSignature]:
        """The program for these inputs, captured now if needed, and never one whose model
        changed since it was captured.

        ``check_model`` compares the whole model fingerprint (done at every request start);
        otherwise only the process-wide registration counter and the program's
        :class:`~adacache.runtime.guards.CallWatch` are compared, and the full comparison
        runs only when one of them moved.
        """
        signature = signature_of(args, kwargs)
        program = self._programs.get(signature)
        if program is not None:
            self._programs.move_to_end(signature)  # least recently used goes first when full
        if program is not None and (
            check_model or program.checked_epoch != guards.registration_epoch() or program.watch.changed()
        ):
            program = self._checked(program, stats)
        if program is None:
            with self._lock:
                program = self._programs.get(signature)
                if program is None:
                    fingerprint, watch = guards.ModelFingerprint.of(self.model), guards.CallWatch.of(self.model)
                    program = build_program(self.model, self.policy, args, kwargs, blocks=self.blocks, backend=self.backend)
                    program.fingerprint = fingerprint
                    program.checked_epoch = guards.registration_epoch()
                    program.watch = watch
                    self._programs[signature] = program
                    stats.captures += 1
                    while len(self._programs) > self.max_programs:
                        self._programs.popitem(last=False)
        return program, signature

    def _checked(self, program: Program, stats: SessionStats) -> Program | None:
        """``program`` if the model still matches its fingerprint; otherwise forget every
        program (all were captured from the old model) and return None."""
        epoch = guards.registration_epoch()
        reason = program.fingerprint.difference(guards.ModelFingerprint.of(self.model)) if program.fingerprint else None
        if reason is None:
            program.checked_epoch = epoch
            if program.watch.changed():  # a watched value moved in a way the fingerprint does not count: rewatch
                program.watch = guards.CallWatch.of(self.model)
            return program
        with self._lock:
            if self._programs:
                self.recaptures.append(Recapture(program.captured.signature.describe(), reason))
                stats.recaptures.append(reason)
                self._programs.clear()
        return None

    def prepare(self, *args: Any, **kwargs: Any) -> Program:
        """Capture and rewrite for these example inputs now instead of at the first call."""
        return self.program_for(args, kwargs, self.current_session().stats)[0]

    @property
    def programs(self) -> list[Program]:
        """The programs captured so far, oldest first."""
        return list(self._programs.values())

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
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
            f"{type(self.model).__name__} was called without a timestep input adacache recognises (looked for: {names}), "
            "so each call counts as one denoising step: classifier-free guidance run as two calls would have the second "
            "call reuse the first one's features, and requests are only told apart by explicit boundaries. Name the "
            "input that carries the timestep: adacache.compile(model, policy, timestep_arg='noise_level')",
            TimestepWarning,
            stacklevel=4,
        )

    def controls(self, program: Program, ctx: StepContext, device: torch.device) -> list[torch.Tensor]:
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
        controls += [self.flag(self.policy.allow_reuse(ctx, site), device) for site in sites]
        return controls

    def flag(self, value: bool, device: torch.device) -> torch.Tensor:
        """Cached 0-d bool tensors, so a schedule costs no host-to-device copy per step."""
        key = (bool(value), device)
        flag = self._flags.get(key)
        if flag is None:
            flag = self._flags[key] = torch.tensor(bool(value), device=device)
        return flag


class CachedModule(nn.Module):
    """The base of every compiled model's class (``isinstance(m, adacache.CachedModule)``).

    A compiled model is an instance of ``type(name, (CachedModule, YourModelClass), ...)``
    sharing your model's state; call it exactly like your model. Its runtime is
    ``compiled.adacache``; nothing else is added to your model's namespace.
    """

    adacache: Runtime  # set on each compiled class

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # replaced per class, with the model's signature
        return type(self).adacache.call(args, kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> "CachedModule":
        # A copy gets copied weights, so it needs programs of its own: compile the copy.
        import copy

        runtime = type(self).adacache
        plain = copy.deepcopy(runtime.model, memo)
        return compiled_view(plain, Runtime(plain, runtime.policy, blocks=runtime.blocks, backend=runtime.backend,
                                            max_programs=runtime.max_programs, timestep_arg=runtime.timestep_arg))

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError(
            "a compiled model cannot be pickled (its class is made at compile time); pickle or save the plain model "
            "(adacache.uncompile(model)) and compile it again after loading"
        )


def compiled_view(model: nn.Module, runtime: Runtime) -> CachedModule:
    """A compiled model over ``model``: same state, a subclass of its class, cached ``forward``."""
    base = type(model)
    if isinstance(model, CachedModule):
        raise TypeError("this model is already compiled by adacache; pass adacache.uncompile(model) to compile it anew")
    original_forward = base.forward

    @functools.wraps(original_forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return runtime.call(args, kwargs)

    cls = type(
        base.__name__,  # diffusers writes the class name into saved configs: keep the model's own
        (CachedModule, base),
        {"adacache": runtime, "forward": forward, "__module__": base.__module__, "__qualname__": base.__qualname__},
    )
    view = object.__new__(cls)
    object.__setattr__(view, "__dict__", model.__dict__)  # one state, two faces
    return view


def plain_model(model: CachedModule) -> nn.Module:
    """The user's model object behind a compiled view (same state, its own class)."""
    return type(model).adacache.model


def _checked_timestep_arg(model: nn.Module, name: str | None) -> str | None:
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
