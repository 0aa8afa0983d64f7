"""An anchor installed on a model (:class:`AnchorRun`) and how each system's adapter plugs
into it (:class:`AnchorBackend`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .base import TRAIN_TIMESTEPS, AnchorConfig, AnchorUnavailable, AttributeSnapshot, blocks_of, timestep_value
from .meter import WorkMeter


class AnchorRun:
    """An anchor installed on a model.

    Attributes:
        config: the anchor setting.
        model: the model the anchor is installed on.
        denoiser: callable with the model's call signature and return type; sets whatever context
            the anchor needs around each model call.
    """

    def __init__(self, model: nn.Module, config: AnchorConfig, backend: AnchorBackend, instrument: bool) -> None:
        self.config = config
        self.model = model
        self._backend = backend
        self._blocks = blocks_of(model)
        # Profile and snapshot before anything is installed: both must see the untouched model.
        self._meter = WorkMeter(model, self._blocks)
        self._snapshot = AttributeSnapshot(model)
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
        self.current_timestep: float = float(TRAIN_TIMESTEPS - 1)
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
            t = timestep_value(t_arg)
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


class AnchorBackend:
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
