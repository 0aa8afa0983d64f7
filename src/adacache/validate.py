"""Checks of values handed to adacache: policy numbers and ``example_inputs``.

Torch-free on purpose (numpy scalars and tensors are recognised by duck typing), so that the
deployment loaders and the command line can share it without importing torch.

Numbers. A policy parameter is a *real scalar*: a Python ``int`` / ``float``, a numpy scalar,
or a 0-d numpy array / torch tensor. Every one of them is converted to a Python ``int`` or
``float`` (``.item()``), so that a policy built from ``np.float32(0.1)`` equals, hashes and
serialises (into export manifests) exactly as one built from ``0.1``: thresholds computed
with numpy or torch are common, and refusing them would only push ``float(...)`` onto every
caller. Anything else (``bool``, strings, tensors of more than one element, complex numbers)
is refused with a message about its *type*, and NaN / infinity with one about finiteness,
before any range is checked, so a range message is never about a value of the wrong kind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .errors import InputError, PolicyError


def _describe(value: Any) -> str:
    """``float32 (0.1)``, ``Tensor of shape (2,)``: the type first, which is what was wrong."""
    kind = type(value).__name__
    shape = getattr(value, "shape", None)
    if shape is not None and getattr(value, "ndim", 0) != 0:
        return f"a {kind} of shape {tuple(shape)}"
    text = repr(value)
    return f"{kind} {text}" if len(text) <= 60 else kind


def real_scalar(value: Any, *, integer: bool = False) -> int | float:
    """``value`` as a Python ``int`` (``integer=True``) or ``float``.

    Raises:
        TypeError: ``value`` is not a single real number (or, with ``integer``, not a whole
            number of an integer type: ``3.0`` is refused, ``np.int64(3)`` is not).
        ValueError: ``value`` is NaN or infinite.
    """
    scalar: Any = value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        # numpy scalars, 0-d numpy arrays and 0-d tensors: unwrap to the Python number.
        item = getattr(value, "item", None)
        if callable(item) and getattr(value, "ndim", None) == 0:
            scalar = item()
    if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
        raise TypeError(f"must be {'an int' if integer else 'a number'}, got {_describe(value)}")
    if integer:
        if not isinstance(scalar, int):
            raise TypeError(f"must be an int, got {_describe(value)}")
        return int(scalar)
    result = float(scalar)
    if not math.isfinite(result):
        raise ValueError(f"must be a finite number, got {result}")
    return result


def policy_number(
    policy: str,
    name: str,
    value: Any,
    *,
    integer: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> Any:
    """Check one numeric policy parameter and return it as a Python number.

    The type and finiteness are checked first (see the module docstring), then the range
    ``[minimum, maximum]`` (``(minimum, maximum]`` with ``exclusive_minimum``).

    Raises:
        PolicyError: naming the policy, the parameter, what it must be and what it got.
    """
    try:
        number = real_scalar(value, integer=integer)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"{policy}: {name} {exc}") from None
    low_ok = minimum is None or (number > minimum if exclusive_minimum else number >= minimum)
    high_ok = maximum is None or number <= maximum
    if not (low_ok and high_ok):
        kind = "an int" if integer else "a number"
        if maximum is None:
            bound = f"{'>' if exclusive_minimum else '>='} {minimum:g}"
        elif minimum is None:
            bound = f"<= {maximum:g}"
        else:
            bound = f"in {'(' if exclusive_minimum else '['}{minimum:g}, {maximum:g}]"
        raise PolicyError(f"{policy}: {name} must be {kind} {bound}, got {number!r}")
    return number


def policy_numbers(policy: str, name: str, values: Any) -> tuple[float, ...]:
    """A non-empty sequence of finite numbers (a tuple, list, or 1-d array) as a tuple of floats.

    Raises:
        PolicyError: the sequence is empty or not a sequence, or an element is not a finite number.
    """
    items: Any = values
    if not isinstance(values, (tuple, list)):
        tolist = getattr(values, "tolist", None)  # a 1-d numpy array or tensor, e.g. np.polyfit's result
        if callable(tolist) and getattr(values, "ndim", None) == 1:
            items = [values[i] for i in range(len(values))]
        else:
            raise PolicyError(f"{policy}: {name} must be a non-empty sequence of numbers, got {_describe(values)}")
    if len(items) == 0:
        raise PolicyError(f"{policy}: {name} must be a non-empty sequence of numbers, got an empty one")
    return tuple(policy_number(policy, f"{name}[{i}]", v) for i, v in enumerate(items))


EXAMPLE_INPUTS_FORM = "an (args, kwargs) pair: a tuple of positional inputs and a dict of keyword inputs, e.g. ((), {'x': x, 'timestep': t})"


def check_example_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Check ``example_inputs`` of ``adacache.compile`` / ``adacache.export`` and normalise it.

    The expected form is ``(args, kwargs)``: ``args`` a tuple (or list) of the positional
    inputs, ``kwargs`` a mapping of keyword names to inputs. A bare dict, a bare tensor or a
    tuple of tensors is the usual mistake, and unpacked as a pair it fails far from here or,
    worse, captures the wrong signature; it is refused here.

    Returns:
        ``(args, kwargs)`` as a tuple and a dict.

    Raises:
        InputError: (a ``TypeError``) ``example_inputs`` is not of that form; the message
            shows the expected form.
    """
    if not isinstance(example_inputs, (tuple, list)) or len(example_inputs) != 2:
        got = f"a {len(example_inputs)}-element {type(example_inputs).__name__}" if isinstance(example_inputs, (tuple, list)) else _describe(example_inputs)
        raise InputError(f"example_inputs must be {EXAMPLE_INPUTS_FORM}; got {got}")
    args, kwargs = example_inputs
    if not isinstance(args, (tuple, list)):
        raise InputError(
            f"example_inputs must be {EXAMPLE_INPUTS_FORM}; its first element is {_describe(args)}, not a tuple "
            "(a single positional input is written ((x,), {}))"
        )
    if not isinstance(kwargs, Mapping):
        raise InputError(f"example_inputs must be {EXAMPLE_INPUTS_FORM}; its second element is {_describe(kwargs)}, not a dict")
    bad_keys = [k for k in kwargs if not isinstance(k, str)]
    if bad_keys:
        raise InputError(f"example_inputs must be {EXAMPLE_INPUTS_FORM}; the keyword names {bad_keys!r} are not strings")
    return tuple(args), dict(kwargs)
