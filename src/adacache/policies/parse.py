"""Parse policy expressions such as ``"AdaCorrection(base=FirstBlockCache(0.08))"``.

Used by the command line. The expression is parsed with :mod:`ast` and only policy
constructors and literals are accepted: nothing is evaluated.
"""

from __future__ import annotations

import ast
from typing import Any

from ..errors import PolicyError
from .base import Policy


def _registry() -> dict[str, type[Policy]]:
    from . import __all__ as names
    from . import __dict__ as namespace  # type: ignore[attr-defined]

    return {n: namespace[n] for n in names if isinstance(namespace[n], type) and issubclass(namespace[n], Policy) and n != "Policy"}


def parse_policy(text: str) -> Policy:
    """Build a policy from ``Name(arg, key=value, base=Other(...))``.

    Raises:
        PolicyError: the text is not a policy expression, names an unknown policy, or has
            invalid parameters (the policy's own validation message).
    """
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise PolicyError(f"cannot parse policy {text!r}: {exc.msg}") from exc
    return _build(tree, _registry(), text)


def _build(node: ast.AST, registry: dict[str, type[Policy]], text: str) -> Any:
    if isinstance(node, ast.Name) and node.id in registry:
        return registry[node.id]()
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        cls = registry.get(node.func.id)
        if cls is None:
            raise PolicyError(f"unknown policy {node.func.id!r} in {text!r}; known: {sorted(registry)}")
        args = [_build(a, registry, text) for a in node.args]
        kwargs = {k.arg: _build(k.value, registry, text) for k in node.keywords if k.arg}
        return cls(*args, **kwargs)
    try:
        return ast.literal_eval(node)
    except ValueError as exc:
        raise PolicyError(f"only policy constructors and literals are allowed in {text!r}") from exc
