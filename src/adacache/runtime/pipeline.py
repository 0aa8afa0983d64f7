"""Compiled diffusers pipelines: every denoiser cached, every pipeline call one request.

``adacache.compile(pipe, policy)`` returns a shallow copy of the pipeline (the same
components, so weights and LoRA are shared with ``pipe``) whose transformer denoisers are
compiled models and whose class is a subclass of the pipeline's own, with one change:
each call runs inside a fresh session of every compiled denoiser, so a request never sees
another request's cache and policies know how many steps it will run. The pipeline passed
in is left as it was, as with a model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import NotEligibleError
from .callers import COMPILED_PIPELINE_MARK
from .module import CachedModule, Runtime, compiled_view, plain_model

#: Pipeline components that are denoisers adacache caches (Wan 2.2 has two).
DENOISER_NAMES = ("transformer", "transformer_2")


def _denoisers(pipe: Any) -> list[str]:
    return [name for name in DENOISER_NAMES if isinstance(getattr(pipe, name, None), nn.Module)]


def compile_pipeline(pipe: Any, policy: Any, make_runtime: Callable[[nn.Module], Runtime]) -> Any:
    """A copy of ``pipe`` with each denoiser compiled by ``make_runtime`` and per-call requests.

    A denoiser that is already compiled with the same policy (a pipeline made with
    ``from_pipe`` from a compiled one, or ``pipe.transformer = adacache.compile(...)``) is
    kept as it is, so pipelines built from the same components share its captured programs.
    """
    names = _denoisers(pipe)
    if not names:
        raise NotEligibleError(
            f"{type(pipe).__name__} has no transformer denoiser (looked for {', '.join(DENOISER_NAMES)}); "
            "adacache caches diffusion transformers. Compile the denoiser module itself with adacache.compile(module, ...)"
        )
    for name in names:
        module = getattr(pipe, name)
        if isinstance(module, CachedModule) and module.adacache.policy != policy:
            raise TypeError(
                f"{type(pipe).__name__}.{name} is already compiled by adacache with {module.adacache.policy.describe()}; "
                f"compile the plain pipeline (adacache.uncompile(pipe)) to use {policy.describe()}"
            )
    compiled = copy.copy(pipe)
    for name in names:
        module = getattr(pipe, name)
        if not isinstance(module, CachedModule):
            setattr(compiled, name, compiled_view(module, make_runtime(module)))
    compiled.__class__ = _request_per_call_class(_plain_pipeline_class(type(pipe)))
    return compiled


def uncompile_pipeline(pipe: Any) -> Any:
    """A copy of ``pipe`` with plain denoisers and the pipeline's own class."""
    plain = copy.copy(pipe)
    plain.__class__ = _plain_pipeline_class(type(pipe))
    for name in DENOISER_NAMES:
        module = getattr(pipe, name, None)
        if isinstance(module, CachedModule):
            setattr(plain, name, plain_model(module))
    return plain


def _plain_pipeline_class(cls: type) -> type:
    return getattr(cls, COMPILED_PIPELINE_MARK, cls)


def steps_of(scheduler: Any) -> int | None:
    """How many distinct timesteps the scheduler will run from where the pipeline starts
    (img2img pipelines start part-way, second-order schedulers repeat timesteps)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    start = getattr(scheduler, "begin_index", None) or 0
    values = [float(t) for t in list(timesteps)[start:]]
    return sum(1 for i, t in enumerate(values) if i == 0 or t != values[i - 1]) or None


@functools.lru_cache(maxsize=None)
def _request_per_call_class(base: type) -> type:
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        scheduler = getattr(self, "scheduler", None)
        total_steps = (lambda: steps_of(scheduler)) if scheduler is not None else None
        with contextlib.ExitStack() as stack:
            for name in DENOISER_NAMES:
                module = getattr(self, name, None)
                if isinstance(module, CachedModule):
                    stack.enter_context(type(module).adacache.session(total_steps=total_steps))
            return base.__call__(self, *args, **kwargs)

    functools.update_wrapper(__call__, base.__call__)
    return type(
        base.__name__,
        (base,),
        {"__call__": __call__, "__reduce_ex__": _refuse_pickling, "__copy__": _copy, "__deepcopy__": _deepcopy,
         COMPILED_PIPELINE_MARK: base, "__module__": base.__module__, "__qualname__": base.__qualname__},
    )


# copy.copy / copy.deepcopy look for these before __reduce_ex__, which pickling uses: copies
# keep working (uncompile, from_pipe), pickling gets a clear error.
def _copy(self: Any) -> Any:
    new = object.__new__(type(self))
    new.__dict__.update(self.__dict__)
    return new


def _deepcopy(self: Any, memo: dict[int, Any]) -> Any:
    new = object.__new__(type(self))
    memo[id(self)] = new
    new.__dict__.update(copy.deepcopy(self.__dict__, memo))
    return new


def _refuse_pickling(self: Any, protocol: int) -> Any:
    raise TypeError(
        f"a compiled {type(self).__name__} cannot be pickled (its class and its denoisers' classes are made at compile "
        "time); pickle or save the plain pipeline (adacache.uncompile(pipe), or pipe.save_pretrained) and compile it "
        "again after loading"
    )
