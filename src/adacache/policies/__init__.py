"""Caching policies: what to reuse, where, and when.

One file per method; :data:`POLICIES` below is the registry, one line per method, read by
``adacache.<Name>``, ``adacache.policies.<Name>`` and the policy expressions of the command
line (:func:`adacache.policies.parse.parse_policy`). Modules load on first use, so importing
``adacache`` stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Every caching method: its class name and the module of this package that defines it.
POLICIES = {
    "NoCache": "nocache",
    "FORA": "fora",
    "FirstBlockCache": "first_block",
    "TaylorSeer": "taylorseer",
    "HiCache": "hicache",
    "PAB": "pab",
    "TeaCache": "teacache",
    "MagCache": "magcache",
    "EasyCache": "easycache",
    "AdaCorrection": "adacorrection",
    "ZCache": "zcache",
}

#: The interface policies are written against (adacache.policies.base).
_INTERFACE = ("Policy", "SitePlan", "StepContext", "policy_dataclass")

__all__ = sorted([*POLICIES, *_INTERFACE])


def __getattr__(name: str) -> Any:
    module = POLICIES.get(name) or ("base" if name in _INTERFACE else None)
    if module is None:
        raise AttributeError(f"module 'adacache.policies' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
