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
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from ..capture import InputSignature
from ..errors import RequestBoundaryWarning
from ..policies.base import Policy
from . import guards
from .callers import calling_plain_pipeline
from .program import Program
from .programs import ProgramCache, Recapture
from .session import Session
from .stats import SessionStats
from .step_inputs import TIMESTEP_NAMES, StepInputs

__all__ = ["CachedModule", "Recapture", "Runtime", "TIMESTEP_NAMES", "compiled_view", "plain_model"]


class Runtime:
    """The state behind a compiled model: its policy, programs and sessions.

    Reach it as ``compiled.adacache``. ``model`` is the plain model (the user's object, of
    its own class), which is what gets captured. The runtime composes three parts and hands
    the first two to each session it makes: a :class:`ProgramCache` (programs per input
    signature, guarded), a :class:`StepInputs` (each call's timestep, the schedule's controls)
    and the sessions themselves (per thread, or entered with ``adacache.session``).
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
        capture: str = "auto",
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
        self.program_cache = ProgramCache(
            model, policy, blocks=blocks, backend=backend, max_programs=max_programs, capture=capture
        )
        self.step_inputs = StepInputs(model, policy, timestep_arg)
        self.timestep_arg = self.step_inputs.timestep_arg
        self._local = threading.local()
        self._warned_plain_pipeline = False

    # What the programs are captured with lives in the program cache; read (and set) it there.
    @property
    def blocks(self) -> str | Sequence[str] | None:
        return self.program_cache.blocks

    @property
    def backend(self) -> str:
        return self.program_cache.backend

    @property
    def capture(self) -> str:
        """The capture mode asked for: ``auto``, ``graph`` or ``blocks``."""
        return self.program_cache.capture

    @property
    def max_programs(self) -> int:
        """How many programs (input signatures) are kept; the least recently used goes first."""
        return self.program_cache.max_programs

    @max_programs.setter
    def max_programs(self, value: int) -> None:
        self.program_cache.max_programs = value

    @property
    def timestep_names(self) -> tuple[str, ...]:
        """The input names read as the call's timestep."""
        return self.step_inputs.timestep_names

    # -- sessions ---------------------------------------------------------------------
    def new_session(self) -> Session:
        """A session over this model's programs and step inputs (not entered)."""
        return Session(self.program_cache, self.step_inputs, self.warn_if_inside_a_plain_pipeline)

    def _stack(self) -> list[Session]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = [self.new_session()]
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
        sess = self.new_session()
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
        owner = calling_plain_pipeline()
        if owner is None:
            return
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

    # -- calls --------------------------------------------------------------------------
    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run one model call in this thread's current session."""
        session = self._local.latest = self.current_session()
        return session.call(args, kwargs)

    # -- programs ---------------------------------------------------------------------
    def program_for(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], stats: SessionStats, *, check_model: bool = True
    ) -> tuple[Program, InputSignature]:
        """The program for these inputs, captured now if needed (see :meth:`ProgramCache.get`)."""
        return self.program_cache.get(args, kwargs, stats, check_model=check_model)

    def prepare(self, *args: Any, **kwargs: Any) -> Program:
        """Capture and rewrite for these example inputs now instead of at the first call."""
        return self.program_for(args, kwargs, self.current_session().stats)[0]

    @property
    def programs(self) -> list[Program]:
        """The programs captured so far, oldest first."""
        return self.program_cache.programs

    @property
    def recaptures(self) -> list[Recapture]:
        """Every time the programs were dropped because the model changed, oldest first."""
        return self.program_cache.recaptures

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
        """The call's timestep as a Python number (see :meth:`StepInputs.timestep`)."""
        return self.step_inputs.timestep(args, kwargs)


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
                                            max_programs=runtime.max_programs, timestep_arg=runtime.timestep_arg,
                                            capture=runtime.capture))

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
