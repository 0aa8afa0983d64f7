"""diffusers' cache hooks as anchors: FirstBlockCache, TaylorSeer, MagCache, Pyramid
Attention Broadcast, FasterCache and SeaCache, each installed through diffusers' own
``apply_*`` entry point (pinned: ``diffusers==0.42.1``)."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .base import (
    BETA_END,
    BETA_START,
    DEFAULT_STEPS,
    TRAIN_TIMESTEPS,
    AnchorConfig,
    AnchorUnavailable,
    alphas_cumprod,
    first_parameter,
    null_class,
    sample_of,
    with_sample,
)
from .run import AnchorBackend, AnchorRun

SYSTEM = "diffusers"


def sweeps(quick: bool, num_inference_steps: int) -> list[AnchorConfig]:
    """Each diffusers anchor over its main knob (``quick``: its recommended setting only)."""
    n = {"num_inference_steps": int(num_inference_steps)}
    out: list[AnchorConfig] = []

    def add(method: str, values: list[dict[str, Any]]) -> None:
        out.extend(AnchorConfig(SYSTEM, method, dict(v)) for v in values)

    # diffusers FirstBlockCache: the same thresholds as adacache's FirstBlockCache sweep.
    fbc = [0.08] if quick else [0.03, 0.05, 0.08, 0.12, 0.2]
    add("FirstBlockCache", [{"threshold": t} for t in fbc])
    # TaylorSeer: refresh interval, Taylor order.  warmup = disable_cache_before_step (default 3).
    ts = [(3, 1)] if quick else [(2, 1), (3, 1), (4, 1), (5, 1), (3, 2), (5, 2)]
    add("TaylorSeer", [{"interval": i, "order": o, "warmup": 3} for i, o in ts])
    # MagCache: accumulated-error threshold; K = 3 and retention 0.2 are the library's defaults.
    mag = [0.06] if quick else [0.02, 0.04, 0.06, 0.1, 0.15]
    add("MagCache", [{"threshold": t, "max_skip_steps": 3, "retention_ratio": 0.2, **n} for t in mag])
    # PAB: spatial-attention broadcast range within the default timestep window (100, 800).
    pab = [2] if quick else [2, 3, 4, 6]
    add("PyramidAttentionBroadcast", [{"interval": k} for k in pab])
    # FasterCache: unconditional-branch reuse interval (paper: 5) with attention interval 2.
    fc = [5] if quick else [2, 3, 5]
    add("FasterCache", [{"attention_interval": 2, "uncond_interval": u} for u in fc])
    # SeaCache (new in diffusers 0.42): accumulated spectral-indicator budget (default 0.25).
    sea = [0.25] if quick else [0.1, 0.25, 0.4, 0.6]
    add("SeaCache", [{"threshold": t, **n} for t in sea])
    return out


class _DiffusersBackend(AnchorBackend):
    """Common driving of diffusers' cache hooks.

    ``DiTTransformer2DModel`` does not inherit diffusers' ``CacheMixin``, so it has neither
    ``enable_cache`` nor ``cache_context``: the hooks are applied with the ``apply_*`` functions
    that ``enable_cache`` itself calls, removed by name like ``disable_cache`` does, and the cache
    context is set with the same private helper ``cache_context`` uses.
    """

    hook_names: tuple[str, ...] = ()
    context_name = "cfg_batch"  # one call per step carries both CFG halves: one context

    def __init__(self, config: AnchorConfig, calibration: Callable[[Callable[..., Any]], Any] | None) -> None:
        super().__init__(config, calibration)
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        # Bound once: they run around every denoiser call.
        self._context_cls = CacheContext
        self._set_context = _set_cache_context

    def install(self, run: AnchorRun) -> None:
        self.apply(run)
        self._invalidate(run.model)
        if self.anchor_modules(run) == 0:
            # A pattern that matches nothing leaves the anchor silently inert; refuse instead.
            raise AnchorUnavailable(f"{self.config.label()}: the anchor attached to no module of {type(run.model).__name__}")

    def apply(self, run: AnchorRun) -> None:
        raise NotImplementedError

    @staticmethod
    def _invalidate(model: nn.Module) -> None:
        from diffusers.hooks import HookRegistry

        # Registering hooks on children stales the root's cached child-registry list, which
        # the context setter walks (diffusers' enable_cache does the same after applying).
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()

    def context(self, run: AnchorRun) -> Any:
        return self._context_cls(
            self.context_name,
            step_index=run.step_index,
            num_inference_steps=self.params.get("num_inference_steps"),
            timestep=run.current_timestep if run.timestep_known else None,
        )

    def call(self, run: AnchorRun, kwargs: dict[str, Any]) -> Any:
        # What `with model.cache_context(...)` does in diffusers' pipelines.
        self._set_context(run.model, self.context(run))
        try:
            return run.model(**kwargs)
        finally:
            self._set_context(run.model, None)

    def reset(self, run: AnchorRun) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(run.model).reset_stateful_hooks(recurse=True)

    def uninstall(self, run: AnchorRun) -> None:
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(run.model)
        for name in self.hook_names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()

    def _hooked(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, module in model.named_modules():
            registry = module.__dict__.get("_diffusers_hook")
            if registry is not None and any(h in registry.hooks for h in self.hook_names):
                yield name, module

    def anchor_modules(self, run: AnchorRun) -> int:
        return sum(1 for _ in self._hooked(run.model))


class _FirstBlockCache(_DiffusersBackend):
    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        self.hook_names = (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK)

    def apply(self, run: AnchorRun) -> None:
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        apply_first_block_cache(run.model, FirstBlockCacheConfig(threshold=float(self.p("threshold", 0.05))))


class _TaylorSeer(_DiffusersBackend):
    # TaylorSeer's default patterns ("^transformer_blocks.*attn", re.fullmatch) match no module
    # of DiT, whose attention is "transformer_blocks.<i>.attn1": the anchor would silently cache
    # nothing.  Name DiT's attention and feed-forward explicitly (the method's own targets).
    _IDENTIFIERS = (r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff")
    workaround = (
        "cache_identifiers set to DiT's transformer_blocks.<i>.attn1 / .ff: the default patterns "
        "('^transformer_blocks.*attn', fullmatch) match no DiT module, so TaylorSeer would cache nothing"
    )

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        self.hook_names = (_TAYLORSEER_CACHE_HOOK,)

    def apply(self, run: AnchorRun) -> None:
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        dtype = getattr(torch, str(self.p("factors_dtype", "float32")))
        apply_taylorseer_cache(
            run.model,
            TaylorSeerCacheConfig(
                cache_interval=int(self.p("interval", 5)),
                disable_cache_before_step=int(self.p("warmup", 3)),
                max_order=int(self.p("order", 1)),
                # float32 factors: the library's bfloat16 default would add rounding error that is
                # not the method's (the diffusers docs' own example uses float32 too).
                taylor_factors_dtype=dtype,
                cache_identifiers=list(self._IDENTIFIERS),
            ),
        )


class _PyramidAttentionBroadcast(_DiffusersBackend):
    needs_timestep = True  # broadcasts only inside its timestep window

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

        self.hook_names = (_PYRAMID_ATTENTION_BROADCAST_HOOK,)

    def apply(self, run: AnchorRun) -> None:
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        window = tuple(self.p("timestep_range", (100, 800)))
        apply_pyramid_attention_broadcast(
            run.model,
            PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=int(self.p("interval", 2)),
                spatial_attention_timestep_skip_range=window,
                # The pipelines pass `lambda: pipe.current_timestep`; the run records it per call.
                current_timestep_callback=lambda: run.current_timestep,
            ),
        )


class _FasterCache(_DiffusersBackend):
    """FasterCache expects ``[uncond; cond]``; the sampler sends ``[cond; uncond]``.

    The smallest fix that leaves the computation unchanged is to swap the halves of every
    batched input on the way in and of the output on the way out.  Two more adaptations are
    needed for DiT's signature: ``class_labels`` is added to the inputs FasterCache splits when
    it drops the unconditional half (its default list names only ``hidden_states``,
    ``encoder_hidden_states``, ``timestep`` and masks, so DiT would get ``2B`` labels for ``B``
    latents), and a scalar timestep is broadcast to the batch so it can be split.
    """

    needs_timestep = True  # its skip windows are timestep ranges
    workaround = (
        "denoiser swaps the CFG halves ([cond; uncond] -> [uncond; cond]) of inputs and output, since "
        "FasterCache assumes the unconditional half first; class_labels added to the inputs it splits "
        "(its default list lacks DiT's class_labels); scalar timestep broadcast to the batch"
    )
    _SPLIT = ("hidden_states", "encoder_hidden_states", "timestep", "attention_mask", "encoder_attention_mask", "class_labels")

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK

        self.hook_names = (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK)

    def apply(self, run: AnchorRun) -> None:
        from diffusers.hooks import FasterCacheConfig, apply_faster_cache

        weight = float(self.p("attention_weight", 0.5))
        apply_faster_cache(
            run.model,
            FasterCacheConfig(
                spatial_attention_block_skip_range=int(self.p("attention_interval", 2)),
                spatial_attention_timestep_skip_range=tuple(self.p("attention_timestep_range", (-1, 681))),
                unconditional_batch_skip_range=int(self.p("uncond_interval", 5)),
                unconditional_batch_timestep_skip_range=tuple(self.p("uncond_timestep_range", (-1, 641))),
                # 0.5 is the library default; passing it explicitly only avoids its warning.
                attention_weight_callback=lambda _module: weight,
                tensor_format="BCHW",  # DiT's latents are images, not videos
                current_timestep_callback=lambda: run.current_timestep,
                _unconditional_conditional_input_kwargs_identifiers=list(self._SPLIT),
            ),
        )

    def call(self, run: AnchorRun, kwargs: dict[str, Any]) -> Any:
        x = kwargs["hidden_states"]
        n = int(x.shape[0])
        null = null_class(run.model)
        labels = kwargs.get("class_labels")
        is_cfg = (
            n % 2 == 0
            and isinstance(labels, torch.Tensor)
            and labels.numel() == n
            and null is not None
            and bool((labels[n // 2 :] == null).all())
        )
        if not is_cfg:
            raise RuntimeError(
                "FasterCache needs a classifier-free-guidance batch [cond; uncond] with the null class "
                f"({null}) in the second half; got batch {n} with labels {labels}"
            )
        half = n // 2
        swapped = dict(kwargs)
        t = kwargs.get("timestep")
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            swapped["timestep"] = t.reshape(1).expand(n)
        elif not isinstance(t, torch.Tensor):
            swapped["timestep"] = torch.full((n,), float(t), device=x.device)
        for key in ("hidden_states", "timestep", "class_labels"):
            v = swapped[key]
            swapped[key] = torch.cat([v[half:], v[:half]])
        out = super().call(run, swapped)
        sample = sample_of(out)
        return with_sample(out, torch.cat([sample[half:], sample[:half]]))


class _MagCache(_DiffusersBackend):
    """MagCache needs the magnitude ratios of *this* model; they are calibrated at install.

    The library's calibration mode runs a generation without skipping and logs the ratios; the
    adapter runs that generation (the caller's sampler if given, else an internal DDIM one) on
    the same model, reads the ratios off the hook state, and installs MagCache with them.
    """

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK

        self.hook_names = (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK)
        self.steps = int(self.p("num_inference_steps", DEFAULT_STEPS))
        self.ratios: list[float] | None = None
        self.calibrated_by = "caller's sampler" if self.calibration is not None else f"internal DDIM sampler ({self.steps} steps)"

    def apply(self, run: AnchorRun) -> None:
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        if "mag_ratios" in self.params:
            self.ratios = [float(r) for r in self.params["mag_ratios"]]
            self.calibrated_by = "given"
        else:
            self.ratios = self._calibrate(run)
        apply_mag_cache(
            run.model,
            MagCacheConfig(
                threshold=float(self.p("threshold", 0.06)),
                max_skip_steps=int(self.p("max_skip_steps", 3)),
                retention_ratio=float(self.p("retention_ratio", 0.2)),
                num_inference_steps=self.steps,
                mag_ratios=list(self.ratios),
            ),
        )

    def _calibrate(self, run: AnchorRun) -> list[float]:
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        apply_mag_cache(run.model, MagCacheConfig(calibrate=True, num_inference_steps=self.steps))
        self._invalidate(run.model)
        tail_hook = run._blocks[-1]._diffusers_hook.get_hook(self.hook_names[1])
        seen: list[list[float]] = []

        def calibrating_denoiser(**kwargs: Any) -> Any:
            out = super(_MagCache, self).call(run, kwargs)
            run._step += 1
            # The hook empties its list after the last step (once it has printed it), so keep a
            # reference to the list object of the running state after every call.
            for state in tail_hook.state_manager._state_cache.values():
                if not seen or seen[-1] is not state.calibration_ratios:
                    seen.append(state.calibration_ratios)
            return out

        try:
            run._step = 0
            # The calibration mode print()s the ratios for copy-pasting; they are read off the state.
            with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                (self.calibration or (lambda d: _ddim_generation(run.model, d, self.steps)))(calibrating_denoiser)
        finally:
            run._step = 0
            self.uninstall(run)
            self._invalidate(run.model)
        ratios = max(seen, key=len, default=[])
        if len(ratios) < 2 or not all(math.isfinite(r) for r in ratios):
            raise AnchorUnavailable(f"MagCache calibration produced no usable ratios ({ratios[:8]})")
        return [float(r) for r in ratios]

    def anchor_stats(self, run: AnchorRun) -> dict[str, Any]:
        return {"calibrated_by": self.calibrated_by, "mag_ratios": None if self.ratios is None else [round(r, 5) for r in self.ratios]}


class _SeaCache(_DiffusersBackend):
    """SeaCache (diffusers 0.42) through its generic path: latents and a flow-matching sigma.

    Its indicator filters the latents with a Wiener-like gain built from ``sigma`` as in
    rectified flow (``x = (1 - sigma) x0 + sigma eps``).  DiT is a DDPM model, so the DDPM
    timestep is given as the sigma with the same signal-to-noise ratio,
    ``sigma = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a))`` with ``a = alpha_bar(t)`` of the DiT linear
    schedule; the gain is normalised to unit mean, so this gives the filter of the DDPM noise
    level exactly.  ``raw_vision_callback`` hands the DiT latents over as ``(C, 1, H, W)``.
    """

    needs_timestep = True  # sigma comes from the timestep
    workaround = (
        "generic SeaCache path: raw_vision_callback returns DiT latents as (C, 1, H, W); sigma in the cache "
        "context is the flow-matching sigma with the DDPM timestep's SNR (linear betas 1e-4..0.02)"
    )

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        from diffusers.hooks import sea_cache

        self.hook_names = (
            sea_cache._SEA_CACHE_ROOT_HOOK,
            sea_cache._SEA_CACHE_LEADER_BLOCK_HOOK,
            sea_cache._SEA_CACHE_BLOCK_HOOK,
            sea_cache._SEA_CACHE_POST_NORM_HOOK,
        )
        self.steps = int(self.p("num_inference_steps", DEFAULT_STEPS))
        self.alphas = alphas_cumprod()

    def apply(self, run: AnchorRun) -> None:
        from diffusers.hooks import SeaCacheConfig, apply_sea_cache

        apply_sea_cache(
            run.model,
            SeaCacheConfig(
                threshold=float(self.p("threshold", 0.25)),
                residual_order=int(self.p("residual_order", 1)),
                retention_steps=int(self.p("retention_steps", 1)),
                cache_end_steps=int(self.p("cache_end_steps", 1)),
                max_consecutive_cached=int(self.p("max_consecutive_cached", 2)),
                power_exp=float(self.p("power_exp", 3.0)),
                raw_vision_callback=_dit_raw_vision,
            ),
        )

    def sigma(self, timestep: float) -> float:
        a = float(self.alphas[int(min(max(round(timestep), 0), len(self.alphas) - 1))])
        return math.sqrt(1.0 - a) / (math.sqrt(a) + math.sqrt(1.0 - a))

    def context(self, run: AnchorRun) -> Any:
        return self._context_cls(
            self.context_name,
            step_index=run.step_index,
            num_inference_steps=self.steps,
            timestep=run.current_timestep,
            sigma=self.sigma(run.current_timestep),
        )


def _dit_raw_vision(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor] | None:
    """SeaCache's model adapter for DiT: one ``(C, T=1, H, W)`` latent per batch element."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        return None
    return [sample.unsqueeze(1) for sample in x.unbind(0)]


@torch.no_grad()
def _ddim_generation(model: nn.Module, denoiser: Callable[..., Any], steps: int, batch: int = 2, guidance: float = 4.0) -> torch.Tensor:
    """One deterministic DDIM generation with CFG, for calibrations that need a trajectory."""
    from diffusers import DDIMScheduler

    p = first_parameter(model)
    cfg = model.config
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    channels, size = int(cfg.in_channels), int(cfg.sample_size)
    null = null_class(model)
    num_classes = null if null is not None else 1
    sched = DDIMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear", beta_start=BETA_START, beta_end=BETA_END, clip_sample=False
    )
    sched.set_timesteps(steps)
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.arange(batch, device=device) % num_classes
    use_cfg = null is not None
    model_labels = torch.cat([labels, torch.full_like(labels, null)]) if use_cfg else labels
    for t in sched.timesteps:
        x_in = torch.cat([x, x]) if use_cfg else x
        t_in = torch.full((x_in.shape[0],), int(t), device=device, dtype=torch.long)
        out = sample_of(denoiser(hidden_states=x_in.to(dtype), timestep=t_in, class_labels=model_labels)).float()
        out = out[:, :channels]
        if use_cfg:
            cond, uncond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = sched.step(out, t, x).prev_sample
    return x


#: The anchors this adapter installs, by method name.
METHODS: dict[str, Callable[..., AnchorBackend]] = {
    "FirstBlockCache": _FirstBlockCache,
    "TaylorSeer": _TaylorSeer,
    "MagCache": _MagCache,
    "PyramidAttentionBroadcast": _PyramidAttentionBroadcast,
    "FasterCache": _FasterCache,
    "SeaCache": _SeaCache,
}

# Anchors in diffusers 0.42.1 that are not DiT caches: TextKVCache caches text-encoder K/V of
# cross-attention (DiT has no text stream) and LayerSkip is a guidance technique.
NOT_APPLICABLE = {
    "TextKVCache": "caches the K/V of text cross-attention, and DiT has no text stream",
    "LayerSkip": "is a guidance technique (skip layers for a perturbed branch), not a cache",
}
