"""argparse value types for the command line: each value is checked when parsed, so a bad
one is a usage error (exit 2) before any model is loaded, not a traceback after minutes of work."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def int_in(minimum: int, maximum: int | None = None, why: str = "") -> Callable[[str], int]:
    """An argparse ``type`` for an integer in ``[minimum, maximum]``; ``why`` explains the bound."""

    def parse(text: str) -> int:
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected an integer {bound}{why}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def finite_float(minimum: float | None = None, why: str = "") -> Callable[[str], float]:
    """An argparse ``type`` for a finite float ``>= minimum``; NaN and infinity are refused."""

    def parse(text: str) -> float:
        bound = "" if minimum is None else f" >= {minimum:g}"
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number{bound}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number{bound}, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number{bound}{why}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def accepted_by(parse: Callable[[str], Any]) -> Callable[[str], str]:
    """An argparse ``type``: the text itself, if ``parse`` accepts it (it is parsed again when
    used); a ``PolicyError`` from ``parse`` becomes a usage error."""

    def check(text: str) -> str:
        from adacache.errors import PolicyError

        try:
            parse(text)
        except PolicyError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    check.__name__ = "policy"
    return check


def _parse_policy(text: str) -> Any:
    from adacache.policies.parse import parse_policy  # imported when an argument is checked, not at start-up

    return parse_policy(text)


#: An argparse ``type`` for a policy expression.
policy_expression = accepted_by(_parse_policy)


def output_folder(text: str) -> str:
    """An argparse ``type``: a folder that exists or can be created, and can be written to.

    Checked up front because the folder is written last, after the work it records.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder path, got an empty string")
    path = Path(text)
    try:
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} exists and is not a folder; name a folder to write into")
        existing = path
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise argparse.ArgumentTypeError(f"cannot create the folder {text}: {existing} is not a folder")
        # Try it rather than ask os.access, which answers yes to root even where a write fails
        # (read-only mounts, /proc); the probe folder is removed at once.
        try:
            with tempfile.TemporaryDirectory(dir=existing, prefix=".adacache-write-check-"):
                pass
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot write to {existing} ({exc.strerror}); choose a folder you can write to") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot use {text} as the output folder: {exc}") from None
    return text
