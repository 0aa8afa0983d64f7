"""cache-dit's DBCache (and DBCache with its TaylorSeer calibrator) as an anchor, installed
through ``cache_dit.enable_cache`` (pinned: ``cache-dit==1.5.3``)."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

from .base import DEFAULT_STEPS, AnchorConfig, AnchorUnavailable
from .run import AnchorBackend, AnchorRun

SYSTEM = "cache-dit"


def sweeps(quick: bool, num_inference_steps: int) -> list[AnchorConfig]:
    """DBCache over its residual-difference threshold and a few Fn/Bn splits, alone and with
    its TaylorSeer calibrator (``quick``: one setting each)."""
    n = {"num_inference_steps": int(num_inference_steps)}
    # DBCache: residual-diff threshold at F1B0 plus a few Fn/Bn splits.  Fn + Bn must
    # leave blocks to cache, and the reference model has only 8 blocks, hence small Fn/Bn.
    if quick:
        db = [(1, 0, 0.08)]
        dbt = [(1, 0, 0.12, 1)]
    else:
        db = [(1, 0, t) for t in (0.04, 0.08, 0.12, 0.2, 0.3)]
        db += [(2, 0, 0.08), (2, 0, 0.12), (1, 1, 0.08), (1, 1, 0.12), (4, 0, 0.12)]
        dbt = [(1, 0, t, 1) for t in (0.08, 0.12, 0.2, 0.3)] + [(1, 0, 0.12, 2)]
    # warmup = max_warmup_steps, cache-dit's default 8.
    out = [AnchorConfig(SYSTEM, "DBCache", {"Fn": f, "Bn": b, "threshold": t, "warmup": 8, **n}) for f, b, t in db]
    out += [AnchorConfig(SYSTEM, "DBCache+TaylorSeer", {"Fn": f, "Bn": b, "threshold": t, "warmup": 8, "order": o, **n})
            for f, b, t, o in dbt]
    return out


@contextlib.contextmanager
def _quiet_cache_dit() -> Iterator[None]:
    """Hold cache-dit's loggers at ERROR while it is (un)installed.

    cache-dit logs a dozen INFO lines per ``enable_cache`` and a WARNING per ``disable_cache``, on
    its own non-propagating handlers, once per benchmark row; nothing of it is an error.
    """
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name == "cache_dit" or name.startswith("cache_dit.")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _CacheDit(AnchorBackend):
    """cache-dit's DBCache (optionally with its TaylorSeer calibrator) on the transformer alone.

    ``cache_dit.enable_cache(transformer)`` finds cache-dit's registered ``"DiT"`` adapter by class
    name; that adapter applies ``DiTPatchFunctor``, cache-dit's own fix for DiT's forward reading
    ``transformer_blocks[0].norm1.emb`` after the block loop (while cache-dit has swapped
    ``transformer_blocks`` for its cached wrapper): the patched forward reads the same module
    through a reference taken beforehand, so the computation is unchanged.  A plain
    ``BlockAdapter`` without that functor crashes with "'CachedBlocks_Pattern_3_4_5' object has
    no attribute 'norm1'"; for a model the registry does not recognise, the adapter builds the
    ``BlockAdapter`` with the functor itself.
    """

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.steps = int(self.p("num_inference_steps", DEFAULT_STEPS))
        self.cache_config: Any = None
        self.calibrator_config: Any = None

    def install(self, run: AnchorRun) -> None:
        import cache_dit
        from cache_dit import BlockAdapter, BlockAdapterRegister, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig

        n_blocks = len(run._blocks)
        fn, bn = int(self.p("Fn", 8)), int(self.p("Bn", 0))
        if fn + bn >= n_blocks:
            raise AnchorUnavailable(
                f"{self.config.label()}: Fn + Bn = {fn + bn} compute blocks leave none of the model's {n_blocks} blocks to cache"
            )
        self.cache_config = DBCacheConfig(
            Fn_compute_blocks=fn,
            Bn_compute_blocks=bn,
            residual_diff_threshold=float(self.p("threshold", 0.08)),
            max_warmup_steps=int(self.p("warmup", 8)),
            max_cached_steps=int(self.p("max_cached_steps", -1)),
            max_continuous_cached_steps=int(self.p("max_continuous_cached_steps", -1)),
            # One call carries both CFG halves (cache-dit's registered DiT default as well).
            enable_separate_cfg=False,
            num_inference_steps=self.steps,
        )
        if self.config.method == "DBCache+TaylorSeer":
            self.calibrator_config = TaylorSeerCalibratorConfig(taylorseer_order=int(self.p("order", 1)))
        target: Any = run.model
        if not BlockAdapterRegister.is_supported(run.model):
            from cache_dit.caching.patch_functors import DiTPatchFunctor

            target = BlockAdapter(
                transformer=run.model,
                blocks=run.model.transformer_blocks,
                forward_pattern=ForwardPattern.Pattern_3,
                patch_functor=DiTPatchFunctor(),
            )
            self.workaround = "model not in cache-dit's registry: BlockAdapter(Pattern_3) with cache-dit's DiTPatchFunctor"
        with _quiet_cache_dit():
            self._enable(cache_dit, target)
        if not getattr(run.model, "_is_cached", False):
            raise AnchorUnavailable(f"{self.config.label()}: cache_dit.enable_cache left the model uncached")

    def _enable(self, cache_dit: Any, target: Any) -> None:
        cache_dit.enable_cache(
            target,
            # enable_cache keeps the config objects; copies keep ours pristine for refreshes.
            cache_config=copy.deepcopy(self.cache_config),
            calibrator_config=copy.deepcopy(self.calibrator_config),
        )

    def reset(self, run: AnchorRun) -> None:
        import cache_dit

        # The transformer-only path keeps a persistent context that refreshes itself only when a
        # generation reaches num_inference_steps; rebuild it explicitly for every generation.
        kwargs: dict[str, Any] = {"cache_config": copy.deepcopy(self.cache_config)}
        if self.calibrator_config is not None:
            kwargs["calibrator_config"] = copy.deepcopy(self.calibrator_config)
        with _quiet_cache_dit():
            cache_dit.refresh_context(run.model, **kwargs)

    def uninstall(self, run: AnchorRun) -> None:
        import cache_dit

        with _quiet_cache_dit():
            cache_dit.disable_cache(run.model)
        # disable_cache keeps DiTPatchFunctor's forward, _is_patched and _norm1_emb on the model
        # (and a later enable_cache would skip the functor, seeing _is_patched); the snapshot
        # restore that follows drops them.

    def _contexts(self, run: AnchorRun) -> list[Any]:
        manager = getattr(run.model, "_context_manager", None)
        out = []
        for name in getattr(run.model, "_context_names", []) or []:
            try:
                out.append(manager.get_context(name))
            except Exception:  # noqa: BLE001 - no context yet (before the first call)
                continue
        return out

    def anchor_stats(self, run: AnchorRun) -> dict[str, Any]:
        contexts = self._contexts(run)
        if not contexts:
            return {}
        ctx = contexts[0]
        cached = list(ctx.get_cached_steps())
        executed = int(ctx.get_accumulated_executed_steps()) if hasattr(ctx, "get_accumulated_executed_steps") else None
        return {
            "cached_steps": len(cached),
            "executed_steps": executed,
            "step_hit_rate": (len(cached) / executed) if executed else None,
        }

    def anchor_modules(self, run: AnchorRun) -> int:
        # cache-dit swaps the whole block list for its cached wrapper inside forward.
        return len(run._blocks) if getattr(run.model, "_is_cached", False) else 0


#: The anchors this adapter installs, by method name.
METHODS: dict[str, Callable[..., AnchorBackend]] = {
    "DBCache": _CacheDit,
    "DBCache+TaylorSeer": _CacheDit,
}
