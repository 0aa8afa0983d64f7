"""Run ``torch.export`` so that nothing another thread can see changes while it traces.

Non-strict ``torch.export`` is not thread-safe, in three ways a server meets:

* it swaps the traced module's parameters and buffers for fake tensors in place
  (``torch.nn.utils.stateless._reparametrize_module``), so another thread running the same
  model meanwhile computes on fake tensors: a ``FakeTensor`` comes back as its output, or an
  assertion of the fake mode is raised, and adacache's guards in that thread take the
  swapped tensors for a changed model;
* while it traces, ``torch.nn.Module.__call__`` and ``__getattr__`` are patched
  process-wide to its tracer's wrappers, so every module call in every thread goes through
  the tracer: other threads' calls push onto the export's module stack ("Unexpected key
  _export_root..." in either thread) and get attribute proxies;
* it keeps its module hierarchy in a module-level global, so two exports at once fail.

:func:`isolated_export` answers each: the tracer sees a *structural copy* of the module tree
(new module objects and parameter tables, the same tensors), so the user's modules are never
touched; the tracer's module-call and attribute hooks run only for the thread that is
exporting (other threads run their modules as usual); and exports are serialised by one
process-wide lock. What stays process-wide for the duration of an export is torch's own:
``torch.compiler.is_compiling()`` reads True and the mkldnn / nnpack / cuDNN flags read off
in every thread (see docs/design.md, "Captures and other threads").
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from torch import nn

T = TypeVar("T")

#: One export at a time in this process: torch.export keeps its state in module globals.
_EXPORT_LOCK = threading.RLock()
_exporting_thread: int | None = None

_HOOK_TABLES = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def structural_copy(model: nn.Module, *, drop_instance_forward: bool = True) -> nn.Module:
    """A copy of ``model``'s module tree that shares every parameter and buffer tensor.

    Each module is a new object of the same class with its own attribute dictionary,
    parameter, buffer, submodule and hook tables, so replacing an entry in the copy (what
    ``torch.export`` does while it traces) leaves ``model`` as it was. A module that appears
    twice in the tree is copied once. ``drop_instance_forward`` removes a ``forward`` set on
    the root instance (accelerate's offload hooks), so the model's own ``forward`` is traced.
    """
    copies: dict[int, nn.Module] = {}

    def copy_module(module: nn.Module) -> nn.Module:
        done = copies.get(id(module))
        if done is not None:
            return done
        new = object.__new__(type(module))
        copies[id(module)] = new
        state = dict(vars(module))
        state["_parameters"] = dict(state["_parameters"])
        state["_buffers"] = dict(state["_buffers"])
        for table in _HOOK_TABLES:
            if table in state:
                state[table] = OrderedDict(state[table])
        state["_modules"] = {name: None if child is None else copy_module(child) for name, child in state["_modules"].items()}
        vars(new).update(state)
        return new

    root = copy_module(model)
    if drop_instance_forward:
        vars(root).pop("forward", None)
    return root


def _tracer_classes() -> list[type]:
    from torch.fx import Tracer
    from torch.fx.experimental import proxy_tensor

    return [Tracer, *(getattr(proxy_tensor, n) for n in ("PythonKeyTracer", "_ModuleStackTracer") if hasattr(proxy_tensor, n))]


@contextlib.contextmanager
def _tracer_hooks_for_this_thread_only() -> Iterator[None]:
    """While the export traces, module calls and attribute reads in *other* threads bypass
    its tracer (it patched ``nn.Module.__call__`` / ``__getattr__`` for every thread)."""
    patched: list[tuple[type, str, Any]] = []

    def only_for_exporter(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        if name == "call_module":
            def call_module(self: Any, module: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
                if threading.get_ident() != _exporting_thread:
                    return forward(*args, **kwargs)
                return original(self, module, forward, args, kwargs)
            return call_module

        def getattr_(self: Any, attr: str, attr_val: Any, parameter_proxy_cache: Any) -> Any:
            if threading.get_ident() != _exporting_thread:
                return attr_val
            return original(self, attr, attr_val, parameter_proxy_cache)
        return getattr_

    for cls in _tracer_classes():
        for name in ("call_module", "getattr"):
            if name in vars(cls):
                original = vars(cls)[name]
                patched.append((cls, name, original))
                setattr(cls, name, only_for_exporter(name, original))
    try:
        yield
    finally:
        for cls, name, original in reversed(patched):
            setattr(cls, name, original)


def isolated_export(export: Callable[[nn.Module], T], model: nn.Module, *, drop_instance_forward: bool = True) -> T:
    """Run ``export(copy)`` on a :func:`structural_copy` of ``model``, one export at a time,
    with the tracer's process-wide hooks confined to this thread."""
    global _exporting_thread
    copy = structural_copy(model, drop_instance_forward=drop_instance_forward)
    with _EXPORT_LOCK:
        outer = _exporting_thread
        _exporting_thread = threading.get_ident()
        try:
            with _tracer_hooks_for_this_thread_only():
                return export(copy)
        finally:
            _exporting_thread = outer
