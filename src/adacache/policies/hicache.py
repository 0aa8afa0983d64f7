"""HiCache: TaylorSeer's cache-then-forecast with a scaled Hermite basis instead of powers."""

from __future__ import annotations

import math

from ..validate import policy_number
from .base import policy_dataclass
from .taylorseer import TaylorSeer


def hermite(n: int, x: float) -> float:
    """The physicists' Hermite polynomial ``H_n(x)`` (``H_0 = 1``, ``H_1 = 2x``,
    ``H_{n+1} = 2x H_n - 2n H_{n-1}``)."""
    previous, current = 1.0, 2.0 * x
    if n == 0:
        return previous
    for m in range(1, n):
        previous, current = current, 2.0 * x * current - 2.0 * m * previous
    return current


def hermite_coefficients(lag: int, order: int, sigma: float) -> list[float]:
    """The forecast's weights at ``lag`` steps after the last full computation:
    ``sigma**i * H_i(sigma * lag) / i!`` for ``i = 0 .. order`` (survey Eq. 47)."""
    return [sigma**i * hermite(i, sigma * lag) / math.factorial(i) for i in range(order + 1)]


@policy_dataclass
class HiCache(TaylorSeer):
    """HiCache (Feng et al. 2025; survey Eq. 47): TaylorSeer's schedule and stored finite
    differences, forecast as ``F + sum_i D_i * sigma**i H_i(sigma k) / i!`` with the
    physicists' Hermite polynomials ``H_i`` instead of TaylorSeer's ``k**i / i!``.

    Powers of ``k`` grow without bound and overshoot over long windows; the contraction
    factor ``sigma`` reshapes each order's weight (``sigma = 1/sqrt(2)`` gives TaylorSeer's
    first-order term exactly, smaller damps it, larger amplifies it) and adds the Hermite
    polynomials' lower terms (the second order carries ``-sigma**2 D_2``). Everything else — the schedule, the memory of
    ``order + 1`` tensors per cached output, the veto re-anchoring under AdaCorrection, the
    export — is TaylorSeer's; only the weights differ, and they travel to a deployed engine
    as a table by lag.

    Args:
        sigma: the contraction factor. The reference implementation uses 0.5 on FLUX and 0.75
            elsewhere; on the reference model 0.75 kept the most of 0.5, 0.75, 0.9 and 1.0 at
            every interval from 3 to 10 (0.5 lost 2.7-4.2 dB), so it is the default here
            (BENCHMARKS.md, "Forecasting bases").
        order, interval, warmup, granularity, reuse, anchor: as :class:`TaylorSeer`.
    """

    order: int = 2
    sigma: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "sigma", policy_number("HiCache", "sigma", self.sigma, minimum=1e-3, maximum=2.0))

    def forecast_basis(self) -> list[list[float]]:
        # Lags 0 .. interval: no window of a fixed schedule is longer (see stepping.forecast_controls).
        return [hermite_coefficients(lag, self.order, self.sigma) for lag in range(self.interval + 1)]
