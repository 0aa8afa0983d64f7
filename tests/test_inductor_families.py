"""torch.compile (Inductor) on every test family (issue 20): the same outputs as eager, the same
reuse decisions, and no recompilation after the first request."""

from __future__ import annotations

import pytest
import torch

import adacache
from families import FAMILIES
from helpers import denoise, moving

POLICIES = {"FORA": lambda: adacache.FORA(interval=2), "TaylorSeer": lambda: adacache.TaylorSeer(order=1, interval=3)}


#: Known failures, each with what it does (strict: a fix shows up as an unexpected pass).
KNOWN: dict[str, str] = {}


def _families() -> list:
    return [pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=KNOWN[f])) if f in KNOWN else f for f in FAMILIES]


def _reused(compiled) -> list[bool]:
    return [any(row["reused"].values()) for row in adacache.summary(compiled).per_step]


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("family", _families())
def test_inductor_matches_eager_and_compiles_once(family, policy):
    import torch._dynamo.utils as dynamo_utils

    model, inputs, _ = FAMILIES[family]()
    inputs = moving(inputs)
    eager = adacache.compile(model, POLICIES[policy]())
    expected = denoise(eager, inputs)
    inductor = adacache.compile(model, POLICIES[policy](), backend="inductor")
    first = denoise(inductor, inputs)  # compiles, once
    assert _reused(inductor) == _reused(eager) and any(_reused(inductor))
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    second = denoise(inductor, inputs)  # another request of the same shapes
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs, "a second request recompiled"
    for step, (want, got, again) in enumerate(zip(expected, first, second)):
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) <= 1e-4 * max(1.0, scale), f"step {step}"
        assert torch.equal(got, again), f"step {step}: the second request differs from the first"
