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

import contextlib
import copy
import io
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "AnchorConfig",
    "AnchorRun",
    "AnchorUnavailable",
    "DEFAULT_STEPS",
    "anchor_sweeps",
    "apply_anchor",
    "supported_anchors",
]

DEFAULT_STEPS = 50
"""Denoising steps the sweeps are built for (the benchmark's default)."""

# DDPM linear beta schedule of the DiT paper (and of adacache's reference model).  Only SeaCache
# needs it, to express a DDPM timestep as the flow-matching sigma it expects, and the internal
# MagCache calibration sampler.
_BETA_START, _BETA_END, _TRAIN_TIMESTEPS = 1e-4, 0.02, 1000

# Parameters that describe the run rather than the anchor's knob: left out of labels.
_LABEL_HIDDEN = frozenset({"num_inference_steps"})


class AnchorUnavailable(RuntimeError):
    """The anchor cannot run on this model; the message is the real reason (error text included)."""


@dataclass(frozen=True)
class AnchorConfig:
    """One anchor setting: which system, which method, which knob values.

    Attributes:
        system: ``"diffusers"`` or ``"cache-dit"``.
        method: e.g. ``"FirstBlockCache"``, ``"TaylorSeer"``, ``"MagCache"``,
            ``"PyramidAttentionBroadcast"``, ``"FasterCache"``, ``"SeaCache"``, ``"DBCache"``,
            ``"DBCache+TaylorSeer"`` (see :func:`supported_anchors`).
        params: the knob values, JSON-serialisable; missing knobs take the anchor's defaults.
    """

    system: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        # The generated hash would fail on the dict field; hash its canonical JSON instead.
        return hash((self.system, self.method, json.dumps(self.params, sort_keys=True)))

    def label(self) -> str:
        """Human-readable row name, e.g. ``"diffusers FirstBlockCache(threshold=0.1)"``."""
        knobs = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items() if k not in _LABEL_HIDDEN)
        return f"{self.system} {self.method}({knobs})"

    def with_params(self, **updates: Any) -> AnchorConfig:
        """A copy with some knob values replaced (e.g. a test's looser threshold)."""
        return AnchorConfig(self.system, self.method, {**self.params, **updates})


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


# --------------------------------------------------------------------------------------------
# sweeps


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
    n = {"num_inference_steps": int(num_inference_steps)}
    out: list[AnchorConfig] = []

    def add(system: str, method: str, values: list[dict[str, Any]]) -> None:
        out.extend(AnchorConfig(system, method, dict(v)) for v in values)

    # diffusers FirstBlockCache: the same thresholds as adacache's FirstBlockCache sweep.
    fbc = [0.08] if quick else [0.03, 0.05, 0.08, 0.12, 0.2]
    add("diffusers", "FirstBlockCache", [{"threshold": t} for t in fbc])
    # TaylorSeer: refresh interval, Taylor order.  warmup = disable_cache_before_step (default 3).
    ts = [(3, 1)] if quick else [(2, 1), (3, 1), (4, 1), (5, 1), (3, 2), (5, 2)]
    add("diffusers", "TaylorSeer", [{"interval": i, "order": o, "warmup": 3} for i, o in ts])
    # MagCache: accumulated-error threshold; K = 3 and retention 0.2 are the library's defaults.
    mag = [0.06] if quick else [0.02, 0.04, 0.06, 0.1, 0.15]
    add("diffusers", "MagCache", [{"threshold": t, "max_skip_steps": 3, "retention_ratio": 0.2, **n} for t in mag])
    # PAB: spatial-attention broadcast range within the default timestep window (100, 800).
    pab = [2] if quick else [2, 3, 4, 6]
    add("diffusers", "PyramidAttentionBroadcast", [{"interval": k} for k in pab])
    # FasterCache: unconditional-branch reuse interval (paper: 5) with attention interval 2.
    fc = [5] if quick else [2, 3, 5]
    add("diffusers", "FasterCache", [{"attention_interval": 2, "uncond_interval": u} for u in fc])
    # SeaCache (new in diffusers 0.42): accumulated spectral-indicator budget (default 0.25).
    sea = [0.25] if quick else [0.1, 0.25, 0.4, 0.6]
    add("diffusers", "SeaCache", [{"threshold": t, **n} for t in sea])
    # cache-dit DBCache: residual-diff threshold at F1B0 plus a few Fn/Bn splits.  Fn + Bn must
    # leave blocks to cache, and the reference model has only 8 blocks, hence small Fn/Bn.
    if quick:
        db = [(1, 0, 0.08)]
        dbt = [(1, 0, 0.12, 1)]
    else:
        db = [(1, 0, t) for t in (0.04, 0.08, 0.12, 0.2, 0.3)]
        db += [(2, 0, 0.08), (2, 0, 0.12), (1, 1, 0.08), (1, 1, 0.12), (4, 0, 0.12)]
        dbt = [(1, 0, t, 1) for t in (0.08, 0.12, 0.2, 0.3)] + [(1, 0, 0.12, 2)]
    # warmup = max_warmup_steps, cache-dit's default 8.
    add("cache-dit", "DBCache", [{"Fn": f, "Bn": b, "threshold": t, "warmup": 8, **n} for f, b, t in db])
    add(
        "cache-dit",
        "DBCache+TaylorSeer",
        [{"Fn": f, "Bn": b, "threshold": t, "warmup": 8, "order": o, **n} for f, b, t, o in dbt],
    )
    return out


# --------------------------------------------------------------------------------------------
# model helpers


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise AnchorUnavailable(f"{type(model).__name__} has no `transformer_blocks` ModuleList to cache")
    return blocks


def _null_class(model: nn.Module) -> int | None:
    """The class index DiT uses as the unconditional label (its label table's extra row)."""
    try:
        return int(model.transformer_blocks[0].norm1.emb.class_embedder.num_classes)
    except AttributeError:
        return None


def _param(model: nn.Module) -> torch.Tensor | None:
    return next(iter(model.parameters()), None)


def _timestep_value(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().flatten()[0].item()) if timestep.numel() else 0.0
    return float(timestep)


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(_BETA_START, _BETA_END, _TRAIN_TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def _sample_of(output: Any) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output[0]


def _with_sample(output: Any, sample: torch.Tensor) -> Any:
    if hasattr(output, "sample"):
        output.sample = sample
        return output
    return (sample, *tuple(output)[1:])


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


class _AttributeSnapshot:
    """Instance attributes (and registered children, parameters, buffers) of every submodule.

    Both systems leave traces after their own removal: diffusers keeps an empty
    ``_diffusers_hook`` registry and an instance-level ``forward``; cache-dit keeps its patched
    ``forward``, ``_is_patched`` and ``_norm1_emb`` (registered as a child module, so it even
    shows in ``named_modules``).  Dropping everything that was not there before puts the model
    back exactly, so the next anchor starts from the untouched class ``forward``.  The order of
    the registries is restored too: cache-dit swaps ``transformer_blocks`` with
    ``unittest.mock.patch.object`` around every forward, which re-inserts it at the end of
    ``_modules`` and so changes the order of ``named_modules()``, ``parameters()`` and the state dict.
    """

    _REGISTRIES = ("_modules", "_parameters", "_buffers")

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._before = [
            (m, frozenset(vars(m)), {r: list(getattr(m, r)) for r in self._REGISTRIES}) for m in model.modules()
        ]
        self._names = [name for name, _ in model.named_modules()]

    def restore(self) -> list[str]:
        dropped: list[str] = []
        for module, keys, registered in self._before:
            for key in set(vars(module)) - keys:
                # pop from __dict__ directly: nn.Module.__delattr__ is for params/buffers/children.
                module.__dict__.pop(key, None)
                dropped.append(f"{type(module).__name__}.{key}")
            for registry, names in registered.items():
                table = getattr(module, registry)
                for key in set(table) - set(names):
                    table.pop(key, None)
                    dropped.append(f"{type(module).__name__}.{key}")
                if list(table) != names:
                    # Re-insert in the original order, in place (the dict object is shared).
                    entries = [(key, table.pop(key)) for key in names if key in table]
                    table.update(entries)
        if [name for name, _ in self._model.named_modules()] != self._names:
            raise RuntimeError("the anchor changed the model's module tree and it could not be restored")
        return dropped


# --------------------------------------------------------------------------------------------
# work meter: what the anchor actually executed


@dataclass
class _FlopProfile:
    """FLOPs per sample of one full forward, split by block and by attention / feed-forward."""

    total: float
    attn: list[float]
    ff: list[float]
    block_rest: list[float]


def _flop_profile(model: nn.Module, blocks: nn.ModuleList) -> _FlopProfile | None:
    """Count the FLOPs of one batch-1 forward of the untouched model.

    ``FlopCounterMode`` does not count the fused CPU attention kernel, so the attention core
    (``4 N^2 d`` per sample) is added from the shapes whenever no SDPA op was counted, which keeps
    CPU and GPU profiles alike.
    """
    from torch.utils.flop_counter import FlopCounterMode

    p = _param(model)
    cfg = getattr(model, "config", None)
    if p is None or cfg is None:
        return None
    size, channels = int(cfg.sample_size), int(cfg.in_channels)
    x = torch.zeros(1, channels, size, size, device=p.device, dtype=p.dtype)
    t = torch.full((1,), 500, device=p.device, dtype=torch.long)
    y = torch.zeros(1, device=p.device, dtype=torch.long)
    q_shapes: dict[int, tuple[int, int]] = {}

    def grab(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            q_shapes[i] = (int(args[0].shape[-2]), int(module.out_features))

        return hook

    handles = [blk.attn1.to_q.register_forward_pre_hook(grab(i)) for i, blk in enumerate(blocks)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(hidden_states=x, timestep=t, class_labels=y)
    except Exception:  # noqa: BLE001 - a profile is a nicety; stats then report no FLOPs
        return None
    finally:
        for h in handles:
            h.remove()
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def flops(name: str) -> tuple[float, bool]:
        ops = counts.get(name, {})
        return float(sum(ops.values())), any("scaled_dot_product" in str(op) for op in ops)

    total, _ = flops(root)
    attn, ff, rest = [], [], []
    for i in range(len(blocks)):
        block_total, _ = flops(f"{root}.transformer_blocks.{i}")
        a, sdpa_counted = flops(f"{root}.transformer_blocks.{i}.attn1")
        f, _ = flops(f"{root}.transformer_blocks.{i}.ff")
        if not sdpa_counted and i in q_shapes:
            tokens, inner = q_shapes[i]
            core = 4.0 * tokens * tokens * inner
            a += core
            total += core
            block_total += core
        attn.append(a)
        ff.append(f)
        rest.append(max(0.0, block_total - a - f))
    if total <= 0:
        return None
    return _FlopProfile(total, attn, ff, rest)


class _WorkMeter:
    """Counts which block parts really ran, with forward pre-hooks inside the blocks.

    The hooks sit on ``attn1.to_q`` (attention ran), on the feed-forward's first layer (MLP ran)
    and on ``norm1`` (the block body ran).  Every anchor skips work by not calling these, so they
    fire only for computation that happened, whichever mechanism the anchor uses (block skip,
    module reuse, halved CFG batch).  The batch size of each execution weights its FLOPs.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        self.blocks = blocks
        self.profile = _flop_profile(model, blocks)
        self.handles: list[Any] = []
        self.reset()

    def reset(self) -> None:
        self.units_run = 0
        self.flops_run = 0.0

    @property
    def attached(self) -> bool:
        return bool(self.handles)

    def attach(self) -> None:
        if self.handles:
            return
        prof = self.profile
        for i, blk in enumerate(self.blocks):
            attn_f = prof.attn[i] if prof else 0.0
            ff_f = prof.ff[i] if prof else 0.0
            rest_f = prof.block_rest[i] if prof else 0.0
            self.handles.append(blk.attn1.to_q.register_forward_pre_hook(self._counter(attn_f, unit=True)))
            self.handles.append(_ff_entry(blk).register_forward_pre_hook(self._counter(ff_f, unit=True)))
            self.handles.append(blk.norm1.register_forward_pre_hook(self._counter(rest_f, unit=False)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _counter(self, flops_per_sample: float, unit: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            rows = int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) else 1
            self.flops_run += flops_per_sample * rows
            if unit:
                self.units_run += 1

        return hook


def _ff_entry(block: nn.Module) -> nn.Module:
    """The first module a block's feed-forward calls (``ff.net[0]`` in diffusers' FeedForward)."""
    ff = block.ff
    net = getattr(ff, "net", None)
    if isinstance(net, nn.ModuleList) and len(net) > 0:
        return net[0]
    for sub in ff.modules():
        if isinstance(sub, nn.Linear):
            return sub
    return ff


# --------------------------------------------------------------------------------------------
# the run object


class AnchorRun:
    """An anchor installed on a model.

    Attributes:
        config: the anchor setting.
        model: the model the anchor is installed on.
        denoiser: callable with the model's call signature and return type; sets whatever context
            the anchor needs around each model call.
    """

    def __init__(self, model: nn.Module, config: AnchorConfig, backend: _Backend, instrument: bool) -> None:
        self.config = config
        self.model = model
        self._backend = backend
        self._blocks = _blocks(model)
        # Profile and snapshot before anything is installed: both must see the untouched model.
        self._meter = _WorkMeter(model, self._blocks)
        self._snapshot = _AttributeSnapshot(model)
        self._removed = False
        self._generations = 0
        self._auto_resets = 0
        self._reset_counters()
        self.denoiser: Callable[..., Any] = self._call
        try:
            backend.install(self)
        except Exception as exc:  # noqa: BLE001 - any install failure makes the row "unavailable"
            self._abort_install()
            if isinstance(exc, AnchorUnavailable):
                raise
            raise AnchorUnavailable(f"{config.label()}: {type(exc).__name__}: {exc}") from exc
        if instrument:
            self._meter.attach()

    # -- driving -------------------------------------------------------------------------------

    def _reset_counters(self) -> None:
        self._calls = 0
        self._rows = 0
        self._step = 0
        self._last_t: float | None = None
        # The timestep of the current call, for anchors that gate on it (see needs_timestep).
        self.current_timestep: float = float(_TRAIN_TIMESTEPS - 1)
        self.timestep_known = False

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        if self._removed:
            raise RuntimeError(f"{self.config.label()} was removed from the model; apply it again")
        kwargs = _as_kwargs(args, kwargs)
        x = kwargs.get("hidden_states")
        t_arg = kwargs.get("timestep", 0)
        t: float | None = None
        # Reading a GPU timestep is a device sync that would stall the launch queue every step;
        # do it only for anchors whose decisions need the value (PAB, FasterCache, SeaCache).
        if self._backend.needs_timestep or not (isinstance(t_arg, torch.Tensor) and t_arg.device.type != "cpu"):
            t = _timestep_value(t_arg)
            # Timesteps decrease within a generation, so a rise means a new one started without
            # new_generation(): reset, so no anchor carries state across generations.
            if self._last_t is not None and t > self._last_t:
                self._auto_resets += 1
                self._start_generation()
            self.current_timestep = t
        self.timestep_known = t is not None
        out = self._backend.call(self, kwargs)
        self._calls += 1
        self._rows += int(x.shape[0]) if isinstance(x, torch.Tensor) else 1
        self._step += 1
        self._last_t = t
        return out

    @property
    def step_index(self) -> int:
        """Index of the current (or next) denoiser call within the generation."""
        return self._step

    def _start_generation(self) -> None:
        self._backend.reset(self)
        self._meter.reset()
        self._reset_counters()
        self._generations += 1

    def new_generation(self) -> None:
        """Reset the anchor's state (and the statistics) before a generation."""
        if self._removed:
            raise RuntimeError(f"{self.config.label()} was removed from the model")
        self._start_generation()

    def set_instrumentation(self, enabled: bool) -> None:
        """Switch the work counters on or off (they add a few Python hooks per block call)."""
        if enabled and not self._removed:
            self._meter.attach()
        else:
            self._meter.detach()

    # -- reporting -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Statistics since the last :meth:`new_generation`.

        Keys: ``calls`` (denoiser calls), ``generations``; ``hit_rate`` (share of the
        per-block attention and feed-forward executions the anchor did not run, the same
        "site" notion as adacache's module granularity) and ``skipped``/``units`` (those counts);
        ``flops_skipped`` (share of the full model's FLOPs not executed, so a halved CFG batch
        counts too) and ``flop_bound`` (``1 / (1 - flops_skipped)``); these are ``None`` when the
        counters are off.  ``workaround`` says what had to be adapted for the anchor to run on
        DiT, or ``None``; ``anchor`` holds what the anchor itself reports; ``anchor_modules`` is
        how many modules carry the anchor's hooks.
        """
        out: dict[str, Any] = {
            "system": self.config.system,
            "method": self.config.method,
            "calls": self._calls,
            "generations": self._generations,
            "auto_resets": self._auto_resets,
            "hit_rate": None,
            "skipped": None,
            "units": None,
            "flops_skipped": None,
            "flop_bound": None,
            "cache_mib": None,
            "instrumented": self._meter.attached,
            "workaround": self._backend.workaround,
            "anchor_modules": self._backend.anchor_modules(self),
            "anchor": self._backend.anchor_stats(self),
        }
        if self._meter.attached and self._calls:
            units = 2 * len(self._blocks) * self._calls
            skipped = max(0, units - self._meter.units_run)
            out.update(hit_rate=skipped / units, skipped=skipped, units=units)
            prof = self._meter.profile
            if prof is not None:
                outside = prof.total - sum(prof.attn) - sum(prof.ff) - sum(prof.block_rest)
                full = prof.total * self._rows
                run = self._meter.flops_run + outside * self._rows
                frac = min(1.0, max(0.0, 1.0 - run / full))
                out.update(flops_skipped=frac, flop_bound=1.0 / max(1e-9, 1.0 - frac))
        return out

    # -- removal -------------------------------------------------------------------------------

    def remove(self) -> None:
        """Uninstall the anchor and restore the model exactly (idempotent)."""
        if self._removed:
            return
        try:
            self._backend.uninstall(self)
        finally:
            self._teardown()

    def _abort_install(self) -> None:
        # Undo whatever part of the installation happened; the snapshot covers the rest.
        try:
            self._backend.uninstall(self)
        except Exception:  # noqa: BLE001 - best effort on a half-installed anchor
            pass
        self._teardown()

    def _teardown(self) -> None:
        self._meter.detach()
        self._snapshot.restore()
        self._removed = True

    def __repr__(self) -> str:
        state = "removed" if self._removed else "installed"
        return f"AnchorRun({self.config.label()}, {state})"


def _as_kwargs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("hidden_states", "timestep", "class_labels", "cross_attention_kwargs", "return_dict")
    if len(args) > len(names):
        raise TypeError(f"denoiser takes at most {len(names)} positional arguments")
    merged = dict(zip(names, args))
    overlap = set(merged) & set(kwargs)
    if overlap:
        raise TypeError(f"denoiser got multiple values for {sorted(overlap)}")
    merged.update(kwargs)
    return merged


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
    _blocks(model)
    backend = factory(config, calibration)
    return AnchorRun(model, config, backend, instrument)


# --------------------------------------------------------------------------------------------
# backends


class _Backend:
    """How one anchor is installed, driven, reset and removed."""

    workaround: str | None = None
    needs_timestep = False  # whether the anchor's decisions read the current timestep

    def __init__(self, config: AnchorConfig, calibration: Callable[[Callable[..., Any]], Any] | None) -> None:
        self.config = config
        self.params = dict(config.params)
        self.calibration = calibration

    def p(self, key: str, default: Any) -> Any:
        return self.params.get(key, default)

    def install(self, run: AnchorRun) -> None:
        raise NotImplementedError

    def call(self, run: AnchorRun, kwargs: dict[str, Any]) -> Any:
        return run.model(**kwargs)

    def reset(self, run: AnchorRun) -> None:
        raise NotImplementedError

    def uninstall(self, run: AnchorRun) -> None:
        raise NotImplementedError

    def anchor_stats(self, run: AnchorRun) -> dict[str, Any]:
        return {}

    def anchor_modules(self, run: AnchorRun) -> int:
        return 0


# -- diffusers ---------------------------------------------------------------------------------


class _DiffusersBackend(_Backend):
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
        null = _null_class(run.model)
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
        sample = _sample_of(out)
        return _with_sample(out, torch.cat([sample[half:], sample[:half]]))


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
        self.alphas = _alphas_cumprod()

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

    p = _param(model)
    cfg = model.config
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    channels, size = int(cfg.in_channels), int(cfg.sample_size)
    null = _null_class(model)
    num_classes = null if null is not None else 1
    sched = DDIMScheduler(
        num_train_timesteps=_TRAIN_TIMESTEPS, beta_schedule="linear", beta_start=_BETA_START, beta_end=_BETA_END, clip_sample=False
    )
    sched.set_timesteps(steps)
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.arange(batch, device=device) % num_classes
    use_cfg = null is not None
    model_labels = torch.cat([labels, torch.full_like(labels, null)]) if use_cfg else labels
    for t in sched.timesteps:
        x_in = torch.cat([x, x]) if use_cfg else x
        t_in = torch.full((x_in.shape[0],), int(t), device=device, dtype=torch.long)
        out = _sample_of(denoiser(hidden_states=x_in.to(dtype), timestep=t_in, class_labels=model_labels)).float()
        out = out[:, :channels]
        if use_cfg:
            cond, uncond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = sched.step(out, t, x).prev_sample
    return x


# -- cache-dit ---------------------------------------------------------------------------------


class _CacheDit(_Backend):
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


_BACKENDS: dict[str, dict[str, Callable[..., _Backend]]] = {
    "diffusers": {
        "FirstBlockCache": _FirstBlockCache,
        "TaylorSeer": _TaylorSeer,
        "MagCache": _MagCache,
        "PyramidAttentionBroadcast": _PyramidAttentionBroadcast,
        "FasterCache": _FasterCache,
        "SeaCache": _SeaCache,
    },
    "cache-dit": {
        "DBCache": _CacheDit,
        "DBCache+TaylorSeer": _CacheDit,
    },
}

# Anchors in diffusers 0.42.1 that are not DiT caches: TextKVCache caches text-encoder K/V of
# cross-attention (DiT has no text stream) and LayerSkip is a guidance technique.
_NOT_APPLICABLE = {
    ("diffusers", "TextKVCache"): "caches the K/V of text cross-attention, and DiT has no text stream",
    ("diffusers", "LayerSkip"): "is a guidance technique (skip layers for a perturbed branch), not a cache",
}
