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
    import adacache.policies as policies

    return {name: getattr(policies, name) for name in policies.POLICIES}


def parse_policy(text: str) -> Policy:
    """Build a policy from ``Name(arg, key=value, base=Other(...))``.

    Every parameter must be written out: ``*args``, ``**kwargs`` and a keyword given twice
    are refused rather than dropped or overridden, so the policy built is the one written.

    Raises:
        PolicyError: the text is not a policy expression, names an unknown policy, has
            invalid parameters (the policy's own validation message), or is a literal
            rather than a policy.
    """
    if not isinstance(text, str):
        raise PolicyError(f"a policy expression must be a string such as 'FORA(interval=3)', got {type(text).__name__}")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise PolicyError(f"cannot parse policy {text!r}: {exc.msg}") from exc
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, absurd nesting
        raise PolicyError(f"cannot parse policy {text!r}: {type(exc).__name__}") from exc
    registry = _registry()
    policy = _build(tree, registry, text)
    if not isinstance(policy, Policy):
        raise PolicyError(
            f"{text!r} is not a policy expression; write a policy constructor such as 'FORA(interval=3)' "
            f"(known policies: {sorted(registry)})"
        )
    return policy


def _build(node: ast.AST, registry: dict[str, type[Policy]], text: str) -> Any:
    if isinstance(node, ast.Name) and node.id in registry:
        return registry[node.id]()
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        cls = registry.get(name)
        if cls is None:
            raise PolicyError(f"unknown policy {name!r} in {text!r}; known: {sorted(registry)}")
        # A starred argument or a ``**mapping`` would be dropped (or half-read) by a plain
        # walk over the call, building a policy other than the one written: refuse them.
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise PolicyError(f"*args is not allowed in the policy expression {text!r}; write each parameter of {name} out")
        if any(k.arg is None for k in node.keywords):
            raise PolicyError(
                f"**kwargs is not allowed in the policy expression {text!r}; write each parameter of {name} out "
                "as name=value"
            )
        seen: set[str] = set()
        for keyword in node.keywords:
            if keyword.arg in seen:  # Python's parser accepts it; the last value would silently win
                raise PolicyError(f"{name} is given {keyword.arg!r} more than once in {text!r}; give each parameter once")
            seen.add(keyword.arg)  # type: ignore[arg-type]
        args = [_build(a, registry, text) for a in node.args]
        kwargs = {k.arg: _build(k.value, registry, text) for k in node.keywords if k.arg is not None}
        try:
            return cls(*args, **kwargs)
        except TypeError as exc:  # e.g. a parameter given both by position and by name
            raise PolicyError(f"invalid parameters for {name} in {text!r}: {exc}") from exc
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as exc:
        raise PolicyError(f"only policy constructors and literals are allowed in {text!r}") from exc
