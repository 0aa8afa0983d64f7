"""Guards: what a captured graph assumed about the model, checked before the graph runs.

``torch.export`` bakes into a graph the module tree of the moment it ran: which submodule
objects exist, which parameter and buffer tensors they hold (the graph keeps references
to the tensors, so in-place edits are seen, but a tensor *replaced* by another is not),
every plain attribute a ``forward`` reads as a Python value (``training``, a PEFT adapter's
``scaling``, which adapters are active, merged or disabled, an attention processor and its
settings), and the dtype and device of the weights. A :class:`ModelFingerprint` records all
of that; a program whose fingerprint no longer matches the model is captured again.

Two costs, two checks:

* the full fingerprint walks every module (about 7 to 14 µs per module on a CPU; see
  BENCHMARKS.md, "What the guards cost"), and is compared at the start of every request;
* within a request, each call compares one integer and a short list: :func:`registration_epoch`
  counts every parameter, buffer and submodule registered anywhere in the process (PyTorch's
  global registration hooks), which is how PEFT, ``load_state_dict(assign=True)`` and
  replaced submodules change a model; a :class:`CallWatch` reads the few attributes the
  changes that register nothing write (``training``, the first parameter's dtype and device,
  each attention processor, each PEFT layer's active / merged / disabled adapters and
  scaling). When either moved, the full fingerprint is compared again.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_PLAIN_TYPES = frozenset({bool, int, float, str, type(None)})
#: nn.Module bookkeeping: hook tables are fingerprinted by their keys, the rest never changes
#: what ``forward`` computes (``training`` does, and is kept).
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")

_epoch = itertools.count(1)
_current_epoch = 0
_hooks_lock = threading.Lock()
_hooks_installed = False


def _bump(*_: Any) -> None:
    global _current_epoch
    _current_epoch = next(_epoch)


def install_registration_hooks() -> None:
    """Count registrations of parameters, buffers and submodules anywhere (once per process)."""
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        from torch.nn.modules import module as module_lib

        module_lib.register_module_parameter_registration_hook(_bump)
        module_lib.register_module_buffer_registration_hook(_bump)
        module_lib.register_module_module_registration_hook(_bump)
        _hooks_installed = True


def registration_epoch() -> int:
    """A number that changes whenever any module registers a parameter, buffer or submodule."""
    return _current_epoch


def _plain_attributes(obj: Any, skip: frozenset[str] = frozenset()) -> tuple[tuple[str, Any], ...]:
    """``(name, value)`` for every plain Python attribute (numbers, strings, flags, and lists,
    sets or string-keyed dicts of them): what a traced ``forward`` reads as a constant."""
    out = []
    for name, value in vars(obj).items():
        if name in skip:
            continue
        kind = type(value)
        if kind in _PLAIN_TYPES:
            out.append((name, kind, value))
        elif kind is list or kind is tuple:
            if all(type(v) in _PLAIN_TYPES for v in value):
                out.append((name, kind, tuple(value)))
        elif kind is set or kind is frozenset:
            if all(type(v) in _PLAIN_TYPES for v in value):
                out.append((name, kind, tuple(sorted(value, key=repr))))
        elif kind is dict:
            if all(type(k) is str and type(v) in _PLAIN_TYPES for k, v in value.items()):
                out.append((name, kind, tuple(sorted(value.items()))))
    return tuple(out)


def _tensors(table: dict[str, torch.Tensor | None]) -> tuple[Any, ...]:
    return tuple((n, None) if t is None else (n, id(t), t.dtype, t.device, t.shape) for n, t in table.items())


def _module_entry(module: nn.Module, is_root: bool) -> tuple[Any, ...]:
    state = vars(module)
    processor = state.get("processor")  # diffusers' Attention keeps a plain-object processor here
    extras: tuple[Any, ...] = ()
    if processor is not None and not isinstance(processor, nn.Module):
        extras = (id(processor), type(processor), _plain_attributes(processor))
    return (
        0 if is_root else id(module),  # the root is the compiled model or its plain twin
        None if is_root else type(module),
        _plain_attributes(module, _MODULE_INTERNALS),
        _tensors(state["_parameters"]),
        _tensors(state["_buffers"]),
        tuple(state["_modules"]),
        tuple(tuple(state[t]) if t in state else () for t in _HOOK_TABLES),
        extras,
    )


@dataclass(frozen=True)
class ModelFingerprint:
    """What a captured graph depends on, module by module, in ``named_modules`` order."""

    names: tuple[str, ...]
    entries: tuple[tuple[Any, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> "ModelFingerprint":
        """Read the fingerprint of ``model`` now."""
        names, entries = [], []
        for name, module in model.named_modules(remove_duplicate=False):
            names.append(name)
            entries.append(_module_entry(module, module is model))
        return cls(tuple(names), tuple(entries))

    def difference(self, other: "ModelFingerprint") -> str | None:
        """A short description of the first thing that differs, or ``None`` when equal."""
        if self.entries == other.entries and self.names == other.names:
            return None
        if self.names != other.names:
            added = sorted(set(other.names) - set(self.names))
            removed = sorted(set(self.names) - set(other.names))
            parts = []
            if added:
                parts.append(f"submodules added: {_few(added)}")
            if removed:
                parts.append(f"submodules removed: {_few(removed)}")
            return "; ".join(parts) or "submodules reordered"
        for name, old, new in zip(self.names, self.entries, other.entries):
            if old != new:
                return f"{name or '<root>'}: {_what_changed(old, new)}"
        return "the model changed"


def _few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _what_changed(old: tuple[Any, ...], new: tuple[Any, ...]) -> str:
    fields = ("module object", "module type", "attributes", "parameters", "buffers", "children", "hooks", "attention processor")
    for label, a, b in zip(fields, old, new):
        if a == b:
            continue
        if label == "attributes":
            before, after = {n: v for n, _, v in a}, {n: v for n, _, v in b}
            keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            return "attribute " + ", ".join(f"{k} {_show(before.get(k))} -> {_show(after.get(k))}" for k in keys[:3])
        if label in ("parameters", "buffers"):
            before, after = {e[0]: e for e in a}, {e[0]: e for e in b}
            keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            return f"{label} replaced or converted: {', '.join(keys[:3])}"
        if label == "module type":
            return f"replaced: {getattr(a, '__name__', a)} -> {getattr(b, '__name__', b)}"
        return f"{label} changed"
    return "changed"


def _show(value: Any) -> str:
    return "(unset)" if value is None else repr(value)


_PEFT_LAYER_STATE = ("_active_adapter", "merged_adapters", "_disable_adapters", "scaling")
_MISSING = object()


def _copy(value: Any) -> Any:
    """A copy of a watched attribute to compare later (PEFT mutates its lists and dicts in place)."""
    if type(value) is list:
        return list(value)
    if type(value) is dict:
        return dict(value)
    return value


@dataclass
class CallWatch:
    """What changes that register nothing write, read at every call: cheap where the
    fingerprint is not (a handful of attributes, four per PEFT layer, and the plain settings
    of each attention processor object). Module
    attributes are read from the module's ``__dict__`` directly (``getattr`` on a module
    walks its class hierarchy first)."""

    processors: tuple[tuple[dict[str, Any], Any], ...]  # (module __dict__, processor object)
    values: tuple[tuple[dict[str, Any], str, Any], ...]  # (module __dict__, attribute, value seen)
    first_parameter: tuple[Any, Any, Any] | None  # (tensor, dtype, device)

    @classmethod
    def of(cls, model: nn.Module) -> "CallWatch":
        processors: list[tuple[dict[str, Any], Any]] = []
        values: list[tuple[dict[str, Any], str, Any]] = [(vars(model), "training", model.training)]
        seen_processors: set[int] = set()
        for module in model.modules():
            state = vars(module)
            processor = state.get("processor")
            if processor is not None:
                processors.append((state, processor))
                if not isinstance(processor, nn.Module) and id(processor) not in seen_processors:
                    # A processor's settings (an IP-Adapter scale a step callback schedules)
                    # are read by the traced forward as constants: watch them like PEFT's.
                    seen_processors.add(id(processor))
                    settings = vars(processor) if hasattr(processor, "__dict__") else {}
                    plain = {name for name, *_ in _plain_attributes(processor)} if settings else set()
                    values += [(settings, name, _copy(settings[name])) for name in plain]
            if "merged_adapters" in state:  # a PEFT tuner layer
                values += [(state, name, _copy(state.get(name, _MISSING))) for name in _PEFT_LAYER_STATE]
        first = next(model.parameters(), None)  # .to(dtype / device) converts every parameter in place
        return cls(tuple(processors), tuple(values), None if first is None else (first, first.dtype, first.device))

    def changed(self) -> bool:
        """Whether any watched attribute differs from when the watch was taken."""
        for state, processor in self.processors:
            if state.get("processor") is not processor:
                return True
        for state, name, seen in self.values:
            if state.get(name, _MISSING) != seen:  # list to list, dict to dict: nothing allocated
                return True
        if self.first_parameter is not None:
            tensor, dtype, device = self.first_parameter
            if tensor.dtype != dtype or tensor.device != device:
                return True
        return False
