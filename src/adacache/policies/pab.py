"""Pyramid Attention Broadcast: reuse attention outputs on a schedule per kind of attention,
inside a window of timesteps."""

from __future__ import annotations

from typing import Any

from ..errors import PolicyError
from ..passes.find_blocks import is_attention
from ..passes.regions import Region
from ..validate import policy_number
from .base import Policy, SitePlan, check, policy_dataclass, rebuild_for

KINDS = ("spatial", "temporal", "cross")


def attention_kind(block: str, attention: Region) -> str | None:
    """``cross`` for an attention call that attends to another sequence (as its module
    says), ``temporal`` for self-attention in a block of a temporal stack, ``spatial`` for
    any other self-attention; ``None`` for a sub-module that is not attention."""
    leaf = attention.name.rsplit(".", 1)[-1]
    if not is_attention(leaf, attention.module_type):
        return None
    if attention.cross_attention is None and leaf == "cross_attn":
        return "cross"  # the module does not say; its name does
    if attention.cross_attention:
        return "cross"
    return "temporal" if "temporal" in block else "spatial"


def _window(name: str, value: Any) -> tuple[float, float]:
    try:
        low, high = (float(policy_number("PAB", name, v)) for v in value)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, PolicyError):
            raise
        raise PolicyError(f"PAB: {name} must be a pair of timesteps (low, high), got {value!r}") from None
    check(low < high, "PAB", f"{name} must be (low, high) with low < high, got {value!r}")
    return (low, high)


@policy_dataclass
class PAB(Policy):
    """Pyramid Attention Broadcast (Zhao et al. 2024, "Real-time video generation with pyramid
    attention broadcast"; survey Sec. III-C): attention outputs change little across the
    middle of sampling, cross-attention least, temporal attention more, spatial attention
    most. Each attention call is its own cache site, computed once every ``*_interval``
    steps (its kind's) and reused in between, but only while the call's timestep lies
    strictly inside its kind's window; outside it (the first and the last steps of
    sampling) every attention computes. Feed-forward layers, norms and everything else run
    every step.

    The decisions follow diffusers' ``PyramidAttentionBroadcastConfig`` step for step (step
    0 computes, then the step count modulo the interval), with the kind of each attention
    read from the module (``is_cross_attention``) and the block it sits in (a temporal
    stack), and the interval counted in denoising steps: classifier-free guidance as two
    calls is one step here (each call keeps its own cache).

    Args:
        spatial_interval / temporal_interval / cross_interval: N for each kind (``None``
            leaves that kind uncached). diffusers' default: spatial 2, the others off.
        spatial_window / temporal_window / cross_window: ``(low, high)`` timesteps between
            which that kind may reuse, on diffusers' 0-1000 scale (its default: (100, 800)); a
            model called with timesteps in [0, 1] (Flux's ``t / 1000``) is read on that
            scale (:func:`adacache.stepping.on_thousand_scale`).
    """

    spatial_interval: int | None = 2
    temporal_interval: int | None = None
    cross_interval: int | None = None
    spatial_window: tuple[float, float] = (100.0, 800.0)
    temporal_window: tuple[float, float] = (100.0, 800.0)
    cross_window: tuple[float, float] = (100.0, 800.0)

    def __post_init__(self) -> None:
        for kind in KINDS:
            interval = getattr(self, f"{kind}_interval")
            if interval is not None:
                object.__setattr__(self, f"{kind}_interval", policy_number("PAB", f"{kind}_interval", interval, integer=True, minimum=1))
            object.__setattr__(self, f"{kind}_window", _window(f"{kind}_window", getattr(self, f"{kind}_window")))
        check(any(getattr(self, f"{k}_interval") is not None for k in KINDS), "PAB",
              "every interval is None, so nothing would be cached; set spatial_interval, temporal_interval or cross_interval")

    def plan(self, blocks: list[Region]) -> list[SitePlan]:
        sites = []
        for block in blocks:
            for sub in block.submodules:
                kind = attention_kind(block.name, sub)
                if kind is None or getattr(self, f"{kind}_interval") is None:
                    continue
                sites.append(SitePlan(name=f"site_{len(sites)}", label=sub.name, regions=(sub,), rebuild=rebuild_for("output"),
                                      blocks=(block.name,), group=kind))
        if not sites:
            found = sorted({kind for b in blocks for s in b.submodules if (kind := attention_kind(b.name, s))})
            raise PolicyError(
                f"PAB found no attention to cache: the blocks' attention calls are of kinds {found or 'none'}, and the "
                f"intervals set are for {[k for k in KINDS if getattr(self, f'{k}_interval') is not None]}; set the "
                "interval of a kind the model has (e.g. cross_interval=6 for a model whose only attention is cross-attention)"
            )
        return sites

    def schedule(self, site: SitePlan) -> dict[str, Any]:
        kind = site.group  # set by plan(): the regions are the outlined site's by now
        low, high = getattr(self, f"{kind}_window")
        return {"kind": "interval", "interval": getattr(self, f"{kind}_interval"), "warmup": 0, "anchor": "start",
                "timestep_window": [low, high]}

    @property
    def proposes_reuse(self) -> bool:  # type: ignore[override]
        return any((getattr(self, f"{k}_interval") or 1) > 1 for k in KINDS)
