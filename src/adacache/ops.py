"""The small tensor functions that the cache pass inserts into a graph.

They are plain compositions of aten ops on purpose: a graph that calls them stays
exportable (``torch.export``), compilable (``torch.compile``) and lowerable to ONNX
without any custom-op registration, and in the rewritten FX graph each one shows up
as one readable node (``cache_load``, ``offset_score``, ``blend`` ...).
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-12


def cache_load(stream: Tensor, cached: Tensor) -> Tensor:
    """Rebuild a skipped region's output from its cached residual: ``stream + cached``."""
    return stream + cached


def residual_of(output: Tensor, stream: Tensor) -> Tensor:
    """The residual a region added to its stream, the form Δ-DiT reuses."""
    return output - stream


def offset_score(fresh: Tensor, cached: Tensor) -> Tensor:
    """Relative L1 change of ``fresh`` against ``cached``, one value per batch item.

    ``mean|fresh - cached| / mean|cached|`` over every dim but the first. One value per
    item, not per batch, so that the conditional and unconditional halves of a CFG batch
    (or two requests batched together) report separate signals.
    """
    dims = tuple(range(1, fresh.dim()))
    num = (fresh - cached).abs().mean(dim=dims)
    den = cached.abs().mean(dim=dims).clamp_min(_EPS)
    return (num / den).to(torch.float32)


def all_finite(*tensors: Tensor) -> Tensor:
    """0-d bool, False when any element of any tensor is NaN or infinite.

    Checked through the sum, one reduction per tensor: a NaN or an infinity anywhere makes
    the sum non-finite. The rare false alarm (a finite tensor whose float32 sum overflows)
    only refuses a reuse, which is the safe side.
    """
    out = torch.isfinite(tensors[0].sum(dtype=torch.float32))
    for t in tensors[1:]:
        out = out & torch.isfinite(t.sum(dtype=torch.float32))
    return out


def blend(use_first: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """Select ``first`` where the 0-d bool ``use_first`` holds, else ``second`` (a graph-level if)."""
    if first.dtype == torch.bool:
        # ONNX Runtime has no boolean Where kernel: spell it with logic ops.
        return (use_first & first) | (~use_first & second)
    return torch.where(use_first, first, second)


def below(score: Tensor, threshold: float) -> Tensor:
    """0-d bool: every batch item's score is finite and below ``threshold``.

    A batch reuses only when every item agrees: one request in a batch never makes
    another request reuse a cache that its own signal calls stale.
    """
    return torch.isfinite(score).all() & (score < threshold).all()


def taylor_forecast(coef: Tensor, *derivatives: Tensor) -> Tensor:
    """TaylorSeer's forecast ``sum_i coef[i] * D_i`` (``coef[i] = k**i / i!``, survey Eq. 42).

    ``coef[0]`` is 1 by construction (``k**0 / 0!``; see :func:`adacache.stepping.forecast_controls`),
    so ``D_0`` enters as it is and each higher term is one fused multiply-add: on a per-block
    site this runs every reused step, and every dispatched op counts there.
    """
    out = derivatives[0]
    for i, d in enumerate(derivatives[1:], start=1):
        out = torch.addcmul(out, d, coef[i].to(d.dtype))
    return out


def taylor_update(valid: Tensor, coef: Tensor, update: Tensor, fresh: Tensor, *old: Tensor) -> list[Tensor]:
    """Refresh the finite differences ``D_0 .. D_m`` after the site computed.

    On a scheduled full step (``coef == [1, 0, ...]``): ``D_0' = fresh`` and
    ``D_i' = (D_{i-1}' - D_{i-1}) * update[i]`` (``update[i]`` is ``1/dt``, or 0 for an order
    the full steps so far cannot estimate yet).

    On a step the schedule meant to forecast but where the site computed anyway (an
    AdaCorrection veto): ``update[i] == 0`` for ``i >= 1`` and ``coef`` holds this step's Taylor
    coefficients. The expansion is re-anchored rather than reset:
    ``D_0' = fresh - sum_{i>=1} coef[i] D_i`` and ``D_i'`` kept, so the rest of the window
    forecasts from the fresh value with the slopes already measured, instead of falling back
    to order 0 until the next full step.

    Without a valid cache (``valid`` False: the first step, or a cache that held a NaN) the
    old terms are not read at all: ``D_0' = fresh`` and every higher difference starts at 0.
    """
    gate = valid.to(fresh.dtype)
    coef_v, update_v = coef.to(fresh.dtype) * gate, update.to(fresh.dtype) * gate
    # where(), not a product: 0 * NaN is NaN, and an invalid cache may hold anything.
    prior = [torch.where(valid, d, torch.zeros_like(d)) for d in old]
    anchor = fresh
    for i in range(1, len(prior)):
        anchor = torch.addcmul(anchor, prior[i], -coef_v[i])
    new = [anchor]
    for i in range(1, len(prior)):
        kept = prior[i] * (coef_v[i] != 0).to(fresh.dtype)  # a forecast step's order-i term stays
        new.append(torch.addcmul(kept, new[i - 1] - prior[i - 1], update_v[i]))
    return new


def _tokens(x: Tensor) -> Tensor:
    """``x`` as (batch, tokens, channels) float32; a view, with no op at all, for float32 models."""
    xf = x.reshape(x.shape[0], -1, x.shape[-1])
    return xf if xf.dtype == torch.float32 else xf.float()  # a trace-time branch


def _mean_token_norm(tokens: Tensor) -> Tensor:
    return torch.linalg.vector_norm(tokens, dim=-1).mean(dim=1).clamp_min(_EPS)


def offset_scale(cached: Tensor) -> Tensor:
    """Mean token norm per batch item of a stored input: the denominator of the offset terms."""
    return _mean_token_norm(_tokens(cached))


def _offset_tokens(x: Tensor, cached: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` and ``cached`` as (batch, tokens, channels) float32, and the cached input's mean token norm."""
    cf = _tokens(cached)
    return _tokens(x), cf, _mean_token_norm(cf) if scale is None else scale


def _temporal(xf: Tensor, cf: Tensor, scale: Tensor) -> Tensor:
    return torch.linalg.vector_norm(xf - cf, dim=-1).mean(dim=1) / scale


def _spatial(xf: Tensor, scale: Tensor) -> Tensor:
    # Channel standard deviation from the first two moments: aten's std kernel is several
    # times slower on CPU at these shapes, and the difference is far below the score's noise.
    mean = xf.mean(dim=-1)
    var = (xf.square().mean(dim=-1) - mean.square()).clamp_min(0.0)
    return var.sqrt().mean(dim=1) / scale


def adacorrection_terms(x: Tensor, cached: Tensor) -> tuple[Tensor, Tensor]:
    """AdaCorrection's offset terms per batch item, normalised by the cached input's scale.

    * temporal (Eq. 1): mean over tokens of ``||x_i - c_i||_2``;
    * spatial (Eq. 2): mean over tokens of the channel standard deviation of ``x_i``;

    both divided by the mean token norm of the cached input ``c``, so that they are
    scale-free and the paper's defaults (gamma = 1, lambda = 1) mean the same on any model.
    Tokens are every dim between the batch and the channel (last) dim.
    """
    xf, cf, scale = _offset_tokens(x, cached)
    return _temporal(xf, cf, scale), _spatial(xf, scale)


def adacorrection_score(x: Tensor, cached: Tensor, lam: float, scale: Tensor | None = None) -> Tensor:
    """Offset score per batch item, ``S = temporal + lam * spatial`` (Eq. 3); the spatial
    term is not computed at all when ``lam == 0``. ``scale``: :func:`offset_scale` of
    ``cached`` when the caller stored it with the input (the graph does)."""
    xf, cf, scale = _offset_tokens(x, cached, scale)
    temporal = _temporal(xf, cf, scale)
    if lam == 0:
        return temporal
    return temporal + lam * _spatial(xf, scale)


def correction_weight(score: Tensor, gamma: float) -> Tensor:
    """``clip(gamma * S, 0, 1)`` (Eq. 6), the batch's worst item: one stale item refreshes the batch."""
    worst = torch.where(torch.isfinite(score), score, torch.full_like(score, float("inf"))).max()
    return (gamma * worst).clamp(0.0, 1.0)


def correct(weight: Tensor, cached: Tensor, fresh: Tensor) -> Tensor:
    """Eq. 7: ``(1 - w) * cached + w * fresh``."""
    w = weight.to(fresh.dtype)
    return (1 - w) * cached + w * fresh


def offset_decision(base: Tensor, valid: Tensor, score: Tensor, gamma: float, accept: float, veto: float) -> Tensor:
    """AdaCorrection's reuse predicate from the per-item offset scores.

    The base's proposal unless the correction weight of the batch's worst item vetoes it
    (``clip(gamma * S, 0, 1) >= veto``), or reuse regardless when that weight is tiny
    (``< accept``); never without a valid cache. Since ``veto <= 1`` the clip never changes
    a comparison, so the thresholds are compared with ``S`` directly, and a NaN score
    (``max`` propagates it) fails both comparisons: the unit computes.
    """
    worst = score.max()
    decision = base & (worst < veto / gamma)
    if accept > 0:  # a trace-time branch: the accept path adds no op when it is off
        decision = decision | (valid & (worst < accept / gamma))
    return decision


def one_like(x: Tensor) -> Tensor:
    """A tensor of ones shaped like ``x`` (ONNX-friendly ``ones_like``)."""
    return torch.ones_like(x)


def polyval(coefficients: tuple[float, ...], x: Tensor) -> Tensor:
    """``numpy.polyval`` (highest degree first), by Horner's rule."""
    out = torch.zeros_like(x)
    for c in coefficients:
        out = out * x + c
    return out


def teacache_gate(probe: Tensor, previous: Tensor, accumulated: Tensor, coefficients: tuple[float, ...], threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """TeaCache (survey Eqs. 22-24) for one step.

    The relative L1 change of the probe (the timestep-modulated input of the first block)
    since the previous step, rescaled by the fitted polynomial and added to the running
    sum. Returns ``(passes, accumulated + rescaled, rescaled)``: ``passes`` says the sum is
    still below ``threshold``, i.e. the cached residual may be reused.
    """
    change = offset_score(probe, previous)
    worst = torch.where(torch.isfinite(change), change, torch.full_like(change, float("inf"))).max()
    rescaled = polyval(coefficients, worst).clamp_min(0.0)
    total = accumulated + rescaled
    return torch.isfinite(total) & (total < threshold), total, rescaled


def _norm(values: list[Tensor]) -> Tensor:
    """The L2 norm of several tensors taken together (one site's streams), in float32."""
    return torch.stack([torch.linalg.vector_norm(v.to(torch.float32)) for v in values]).square().sum().sqrt()


def _change(values: list[Tensor], previous: list[Tensor]) -> Tensor:
    return _norm([v - p for v, p in zip(values, previous)])


def transformation_drift(xs: list[Tensor], previous_xs: list[Tensor], previous_vs: list[Tensor], rate: Tensor,
                         accumulated: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """EasyCache's gate for one step (survey Eq. 33): the drift ``rate * |x - x_prev| /
    |v_prev|`` added to the running sum, ``x`` and ``v`` a site's input and output streams.
    Returns ``(passes, accumulated + drift)``; ``passes`` says the sum is finite and below
    ``threshold`` (an unknown rate, infinite, never passes)."""
    drift = rate * _change(xs, previous_xs) / _norm(previous_vs).clamp_min(_EPS)
    total = accumulated + drift
    return torch.isfinite(total) & (total < threshold), total


def transformation_rate(vs: list[Tensor], previous_vs: list[Tensor], xs: list[Tensor], previous_xs: list[Tensor],
                        known: Tensor) -> Tensor:
    """EasyCache's relative transformation rate ``|v - v_prev| / |x - x_prev|`` (survey Eq. 31);
    infinite where the previous step is not ``known``, or the input did not move (by more than
    1e-5 of its norm: below that the quotient is float rounding over rounding), so that the
    next step computes and measures it."""
    moved = _change(xs, previous_xs)
    rate = _change(vs, previous_vs) / moved
    defined = known & (moved > 1e-5 * _norm(xs)) & torch.isfinite(rate)
    return torch.where(defined, rate, torch.full_like(rate, float("inf")))


def keep_if(keep: Tensor, value: Tensor) -> Tensor:
    """``value`` where the 0-d bool ``keep`` holds, else zeros (TeaCache resets its sum on a full step)."""
    return torch.where(keep, value, torch.zeros_like(value))
