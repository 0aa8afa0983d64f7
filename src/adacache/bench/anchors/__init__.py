"""Today's DiT cache systems ("anchors") applied to a diffusers ``DiTTransformer2DModel``.

The benchmark compares adacache's policies with the caches people already use, on the same
weights, in the same process.  Each anchor is installed on the model through its own public
entry point (``diffusers.hooks.apply_*`` or ``cache_dit.enable_cache``) and driven the way its
own pipelines drive it (cache contexts, state resets between generations), so the numbers are
those of the anchor and not of a re-implementation.

Pinned versions: ``diffusers==0.42.1`` and ``cache-dit==1.5.3`` (see ``pyproject.toml``, extra
``bench``).  Several adapters depend on details of exactly these versions; they are documented
where they are used and recorded in ``AnchorRun.stats()["workaround"]``.

The sampler contract assumed here (that of :func:`adacache.reference.sample`): one denoiser call
per step, ``denoiser(hidden_states=x, timestep=t, class_labels=y)`` returning an object with
``.sample``; with classifier-free guidance the batch is ``[cond; uncond]`` (``2B``, the null
class in the second half); timesteps decrease within a generation; generations follow one
another on the same model object, each announced with :meth:`AnchorRun.new_generation`.

Example::

    run = apply_anchor(model, AnchorConfig("diffusers", "FirstBlockCache", {"threshold": 0.08}))
    run.new_generation()
    images = sample(run.denoiser, labels, num_steps=50, guidance_scale=4.0)
    print(run.stats())
    run.remove()  # the model computes exactly as before again
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from . import cache_dit_dbcache, diffusers_hooks
from .base import DEFAULT_STEPS, AnchorConfig, AnchorUnavailable, blocks_of
from .run import AnchorBackend, AnchorRun

__all__ = [
    "AnchorConfig",
    "AnchorRun",
    "AnchorUnavailable",
    "DEFAULT_STEPS",
    "anchor_sweeps",
    "apply_anchor",
    "supported_anchors",
]

#: One module per anchor system; each names its ``SYSTEM``, its ``METHODS`` and its ``sweeps``.
_SYSTEMS = (diffusers_hooks, cache_dit_dbcache)
_BACKENDS: dict[str, dict[str, Callable[..., AnchorBackend]]] = {system.SYSTEM: system.METHODS for system in _SYSTEMS}
_NOT_APPLICABLE = {(diffusers_hooks.SYSTEM, method): reason for method, reason in diffusers_hooks.NOT_APPLICABLE.items()}


def supported_anchors() -> dict[str, tuple[str, ...]]:
    """The methods each system adapter knows, by system name."""
    return {system: tuple(sorted(methods)) for system, methods in _BACKENDS.items()}


def anchor_sweeps(quick: bool = False, num_inference_steps: int = DEFAULT_STEPS) -> list[AnchorConfig]:
    """Sweeps over each anchor's main knob (threshold, interval, Fn/Bn, order).

    Args:
        quick: 1-2 configurations per method (each anchor's recommended / default setting)
            instead of the full sweep.
        num_inference_steps: steps per generation; MagCache, SeaCache and cache-dit need it.

    Returns:
        Configurations in a stable order: diffusers methods first, then cache-dit.
    """
    return [config for system in _SYSTEMS for config in system.sweeps(quick, num_inference_steps)]


def apply_anchor(
    model: nn.Module,
    config: AnchorConfig,
    *,
    calibration: Callable[[Callable[..., Any]], Any] | None = None,
    instrument: bool = True,
) -> AnchorRun:
    """Install an anchor on ``model`` (in place) and return the handle that drives it.

    Args:
        model: a diffusers ``DiTTransformer2DModel`` without other caches installed.
        config: which anchor, with which knob values.
        calibration: for anchors that calibrate on the model (MagCache): a callable that runs one
            complete generation with the denoiser it is given, ideally the benchmark's own
            sampler.  Default: an internal DDIM sampler (linear betas, ``num_inference_steps``
            steps, 2 samples, CFG 4.0).
        instrument: count what the anchor really executes (``stats()`` hit rate and FLOPs); the
            counters are a few forward pre-hooks per block, see :meth:`AnchorRun.set_instrumentation`.

    Raises:
        AnchorUnavailable: the anchor cannot run on this model; the message has the reason.
    """
    reason = _NOT_APPLICABLE.get((config.system, config.method))
    if reason is not None:
        raise AnchorUnavailable(f"{config.system} {config.method} {reason}")
    methods = _BACKENDS.get(config.system)
    if methods is None:
        raise AnchorUnavailable(f"unknown anchor system {config.system!r}; known: {sorted(_BACKENDS)}")
    factory = methods.get(config.method)
    if factory is None:
        raise AnchorUnavailable(f"{config.system} has no method {config.method!r} here; known: {sorted(methods)}")
    blocks_of(model)
    backend = factory(config, calibration)
    return AnchorRun(model, config, backend, instrument)

