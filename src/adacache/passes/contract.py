"""The contract between caching policies and the passes: the words a policy may use to
describe a cache site, owned by the passes.

A policy plans *sites* (:class:`SitePlan`) and says, for each, only in these terms:

* **what it covers**: consecutive regions of the captured graph (blocks, or the attention /
  feed-forward calls inside them), and its *role*: ``cached`` (may be skipped), ``probe``
  (always runs and scores the drift other sites are gated by) or ``fresh`` (outlined only);
* **how a reuse rebuilds the value** (:data:`Rebuild`): the stale output as it was
  (:class:`StaleOutput`), the residual the site added, applied to the current input
  (:class:`ResidualOnInput`, Δ-DiT form), or a Taylor forecast from stored finite
  differences of either (:class:`Forecast`); the rebuild also fixes what the compute branch
  stores (one tensor per output, ``order + 1`` for a forecast);
* **which terms join its reuse predicate** (:data:`Term`), each ANDed after the host-side
  schedule control and the cache's validity that every cached site has: a probe site's score
  under a threshold (:class:`ProbeBelow`), an accumulated rescaled change of a node inside
  the site (:class:`AccumulatedChange`), another site's accumulated-change verdict
  (:class:`FollowsGate`), the drift predicted from the site's own transformation rate
  (:class:`TransformationRate`), and the offset score of the site's input (:class:`OffsetScore`,
  which also keeps that input and may blend the fresh output with the cache).

The state a site keeps between steps (:class:`StateSpec`) and the rewritten graph's calling
convention (:class:`CacheLayout`) are the passes' answer to a plan. Nothing here names a
caching method: the passes import no policy, and a new method is a new combination of these
words (or, when it needs one, a new word here and its lowering in the insert pass).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch

from .regions import Region

#: The graph inputs and outputs the passes add are named ``<group>__<site>__<part>``; the
#: group says what they carry: ``cache`` (state), ``allow`` and ``forecast`` (controls),
#: ``signal`` (a call's reuse decisions and scores). Readers get a name's group from
#: :func:`name_group`; the specs in :class:`CacheLayout` carry everything else.
_NAME_SEPARATOR = "__"


def graph_name(group: str, *parts: str) -> str:
    """The name of a graph input or output the passes add (see :func:`name_group`)."""
    return _NAME_SEPARATOR.join((group, *parts))


def name_group(name: str) -> str | None:
    """The group of a name made by :func:`graph_name` (``cache``, ``allow``, ...), else None."""
    group, separator, _ = name.partition(_NAME_SEPARATOR)
    return group if separator else None


Role = Literal["cached", "probe", "fresh"]
ReuseForm = Literal["residual", "output"]


# -- how a reuse rebuilds a site's outputs ------------------------------------------------

@dataclass(frozen=True)
class StaleOutput:
    """Reuse the output the site produced when it last ran, as it is."""


@dataclass(frozen=True)
class ResidualOnInput:
    """Reuse the residual the site added (``output - input`` of its stream), applied to the
    current input; an output without a stream is reused as it is."""


@dataclass(frozen=True)
class Forecast:
    """A Taylor forecast of order ``order`` of ``of``'s value from stored finite differences
    (TaylorSeer); the host feeds the coefficients of each step."""

    order: int
    of: Union[StaleOutput, ResidualOnInput] = field(default_factory=ResidualOnInput)


Rebuild = Union[StaleOutput, ResidualOnInput, Forecast]


def rebuild_for(reuse: ReuseForm, order: int = 0) -> Rebuild:
    """The rebuild for a reuse form (``residual`` / ``output``), forecast when ``order`` > 0."""
    base: Union[StaleOutput, ResidualOnInput] = ResidualOnInput() if reuse == "residual" else StaleOutput()
    return Forecast(order, base) if order else base


# -- terms of the reuse predicate -----------------------------------------------------------

@dataclass(frozen=True)
class OffsetRule:
    """The decision from the offset score ``S`` of the site's input against the input of its
    last full step: ``w = clip(gamma * S, 0, 1)``; reuse when the other terms propose it and
    ``w < veto``, or whatever they propose when ``w < accept``. With ``band`` a computed step
    blends the fresh output with the corrected cache by ``w``."""

    gamma: float
    lam: float
    accept: float
    veto: float
    band: bool


@dataclass(frozen=True)
class ProbeBelow:
    """Reuse only while the score of probe site ``probe`` is below ``threshold``."""

    probe: str
    threshold: float


@dataclass(frozen=True)
class AccumulatedChange:
    """Reuse while the accumulated rescaled relative change of ``node`` (a graph node inside
    the site, hoisted in front of it) stays below ``threshold``; ``coefficients`` rescale the
    change (a polynomial, highest degree first)."""

    node: Any
    coefficients: tuple[float, ...]
    threshold: float


@dataclass(frozen=True)
class FollowsGate:
    """Reuse only when site ``site``'s accumulated-change verdict at this step was reuse
    (``threshold`` is that gate's, for descriptions and manifests)."""

    site: str
    threshold: float


@dataclass(frozen=True)
class TransformationRate:
    """Reuse while the predicted drift since the last full step stays below ``threshold``:
    at each step ``k * |x_n - x_(n-1)| / |v_(n-1)|`` is added to a running sum, where ``x``
    is the site's input stream, ``v`` its output, and ``k`` the rate ``|v_i - v_(i-1)| /
    |x_i - x_(i-1)|`` measured at the last full step (``v`` as the site returned it, cached
    or not). A full step restarts the sum."""

    threshold: float


@dataclass(frozen=True)
class OffsetScore:
    """Score the site's input against the input of its last full step (:class:`OffsetRule`)."""

    rule: OffsetRule


Term = Union[ProbeBelow, AccumulatedChange, FollowsGate, TransformationRate, OffsetScore]


# -- a site -------------------------------------------------------------------------------

@dataclass
class SitePlan:
    """One place in the graph where a cache decision is made, in the contract's words.

    Attributes:
        name: graph-level identifier (``site_3``); names placeholders and outputs.
        label: the modules it covers, for humans (``transformer_blocks.1..11``).
        regions: the consecutive regions (blocks or sub-modules) the site covers.
        role: ``cached``, ``probe`` or ``fresh`` (see the module docstring).
        rebuild: how a reuse rebuilds the site's outputs (and so what is stored).
        terms: the terms its reuse predicate adds to schedule and validity.
        blocks: the blocks it covers, by qualified name.
        params: attribute paths of the parameters the site reads (set by ``outline_sites``).
        group: the policy's own kind of site, read back by its schedule (PAB: which kind of
            attention); the passes never read it.
    """

    name: str
    label: str
    regions: tuple[Region, ...]
    role: Role = "cached"
    rebuild: Rebuild = field(default_factory=ResidualOnInput)
    terms: tuple[Term, ...] = ()
    blocks: tuple[str, ...] = field(default_factory=tuple)
    params: tuple[str, ...] = field(default_factory=tuple)
    group: str = ""

    def term(self, kind: type) -> Any:
        """The site's term of this kind, or ``None``."""
        return next((t for t in self.terms if isinstance(t, kind)), None)

    def with_term(self, old: Any, new: Any) -> None:
        """Replace term ``old`` by ``new`` (``None`` drops it)."""
        self.terms = tuple(new if t is old else t for t in self.terms if not (t is old and new is None))

    def renamed_sites(self, names: dict[str, str]) -> None:
        """Point the terms that name other sites at their new names."""
        self.terms = tuple(
            dataclasses.replace(t, probe=names[t.probe]) if isinstance(t, ProbeBelow)
            else dataclasses.replace(t, site=names[t.site]) if isinstance(t, FollowsGate) else t
            for t in self.terms
        )

    # -- read views the passes, manifests and summaries use --------------------------------
    @property
    def reuse(self) -> ReuseForm:
        """``residual`` or ``output``: the form a reuse rebuilds (under any forecast)."""
        base = self.rebuild.of if isinstance(self.rebuild, Forecast) else self.rebuild
        return "residual" if isinstance(base, ResidualOnInput) else "output"

    @property
    def order(self) -> int:
        """Taylor order of the forecast on reuse; 0 reuses the stored value as is."""
        return self.rebuild.order if isinstance(self.rebuild, Forecast) else 0

    @property
    def gated_by(self) -> str | None:
        """The probe site whose score gates this one."""
        gate = self.term(ProbeBelow)
        return gate.probe if gate else None

    @property
    def threshold(self) -> float | None:
        """The threshold of the site's in-graph gate (probe score or accumulated change)."""
        gate = self.term(ProbeBelow) or self.term(AccumulatedChange) or self.term(FollowsGate) or self.term(TransformationRate)
        return gate.threshold if gate else None

    @property
    def offset(self) -> OffsetRule | None:
        score = self.term(OffsetScore)
        return score.rule if score else None

    @property
    def probe(self) -> Any:
        """The node whose change an accumulated-change gate measures."""
        gate = self.term(AccumulatedChange)
        return gate.node if gate else None

    @property
    def coefficients(self) -> tuple[float, ...]:
        gate = self.term(AccumulatedChange)
        return gate.coefficients if gate else ()

    @property
    def follows(self) -> str | None:
        gate = self.term(FollowsGate)
        return gate.site if gate else None


def span_label(regions: tuple[Region, ...] | list[Region]) -> str:
    """``transformer_blocks.1..11`` for a run of blocks, the name itself for one."""
    if len(regions) == 1:
        return regions[0].name
    first, last = regions[0].name, regions[-1].name
    head, _, _ = first.rpartition(".")
    return f"{first}..{last.rpartition('.')[2]}" if last.startswith(head + ".") else f"{first}..{last}"


# -- what the passes make of a plan ---------------------------------------------------------

@dataclass
class StateSpec:
    """One cache tensor carried between steps: a graph input and the matching output.

    ``role`` says what it holds, so that nothing needs to read it from the name: ``value``
    (an output's stored value, ``D_0`` of a forecast), ``difference`` (``D_j``, j >= 1),
    ``input`` and ``input_scale`` (the offset score's stored input and its scale),
    ``measure`` and ``accumulated`` (an accumulated-change gate's last measured value and
    running sum), ``valid`` (the cache's validity flag). ``output`` and ``difference``
    locate ``value`` / ``difference`` tensors.
    """

    name: str
    site: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: str = "value"
    output: int | None = None
    difference: int = 0

    @property
    def kind(self) -> str:
        """``valid`` (the 0-d bool validity flag) or ``cache`` (every other state tensor)."""
        return "valid" if self.role == "valid" else "cache"


@dataclass(frozen=True)
class ControlSpec:
    """A host-side graph input fed at every call: a site's reuse-allowed flag, or the
    forecast's coefficients or update factors for this step."""

    name: str
    kind: Literal["allow", "forecast_coef", "forecast_update"]
    site: str | None = None


@dataclass(frozen=True)
class SignalSpec:
    """A graph output the runtime reads: a site's reuse verdict, or the score it decided by."""

    name: str
    site: str
    kind: Literal["reused", "score"]


@dataclass
class CacheLayout:
    """How the rewritten graph's extra inputs and outputs are laid out.

    Inputs: ``num_user_inputs`` user leaves, then ``controls`` (0-d bool, one per cached
    site), then ``states``. Outputs: ``num_user_outputs`` user leaves, then ``states`` (the
    updated cache, same order), then ``signals``.
    """

    num_user_inputs: int
    num_user_outputs: int
    sites: list[SitePlan] = field(default_factory=list)
    controls: list[ControlSpec] = field(default_factory=list)
    #: highest Taylor order of any site; > 0 adds the ``forecast__coef`` / ``forecast__update`` controls.
    forecast_order: int = 0
    states: list[StateSpec] = field(default_factory=list)
    signals: list[SignalSpec] = field(default_factory=list)

    def initial_state(self, device: torch.device) -> list[torch.Tensor]:
        """Zero caches marked invalid: the first call over them computes everything."""
        return [torch.zeros(s.shape, dtype=s.dtype, device=device) for s in self.states]
