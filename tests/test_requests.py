"""Request boundaries: no call ever reuses a cache filled by another request.

The step tracker's rules are pinned one by one, then driven through a compiled model the
way real clients misuse it (one-step requests, cancelled requests, img2img after txt2img,
CFG as two calls, Heun's repeated timesteps, rising Lumina timesteps), and finally checked
as a property over random request sequences.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adacache
from adacache.stepping import MAX_GAP_GROWTH, NEW_REQUEST, NEXT_SLOT, NEXT_STEP, RESTART, StepTracker
from families import FAMILIES, _randomize


# -- the tracker's rules -----------------------------------------------------------------

def events(timesteps, *, explicit: bool = False) -> list[str]:
    tracker = StepTracker()
    if explicit:
        tracker.begin_request()
    return [tracker.advance(t) for t in timesteps]


def test_explicit_request_counts_steps_and_slots():
    assert events([999, 999, 979, 979, 959], explicit=True) == [NEW_REQUEST, NEXT_SLOT, NEXT_STEP, NEXT_SLOT, NEXT_STEP]


def test_inferred_request_restarts_at_its_first_change_of_timestep():
    # The first call may have been a one-step request (or a cancelled one) and the second the
    # next request's first: nothing from the first call may be reused by the second.
    assert events([999, 979, 959, 939]) == [NEW_REQUEST, RESTART, NEXT_STEP, NEXT_STEP]


def test_a_restart_keeps_the_step_count():
    # Issue 31: only the caches start again; the schedule keeps the place an explicit request
    # would give each call, so a bare loop decides as an explicit request at every later step.
    bare, explicit = StepTracker(), StepTracker()
    explicit.begin_request()
    positions = {"bare": [], "explicit": []}
    for t in [999, 999, 979, 979, 959, 959]:
        for name, tracker in (("bare", bare), ("explicit", explicit)):
            tracker.advance(t)
            positions[name].append((tracker.step, tracker.slot, tracker.fresh_from))
    assert [p[:2] for p in positions["bare"]] == [p[:2] for p in positions["explicit"]] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [p[2] for p in positions["bare"]] == [0, 0, 1, 1, 1, 1], "the caches hold nothing from before step 1"
    assert [p[2] for p in positions["explicit"]] == [0] * 6
    bare.advance(999)  # a new request: its caches and its count start at 0
    assert (bare.step, bare.fresh_from) == (0, 0)


def test_reversal_starts_a_new_inferred_request_even_after_an_explicit_one():
    assert events([999, 979, 959, 999])[-1] == NEW_REQUEST
    # The caller who marked the first request may not mark the next: what follows is inferred.
    assert events([999, 979, 959, 999, 979], explicit=True)[-2:] == [NEW_REQUEST, RESTART]


def test_jump_beyond_the_spacing_is_a_new_request_only_when_inferred():
    gap = 20
    ts = [999, 999 - gap, 999 - 2 * gap]
    far = ts[-1] - gap * (MAX_GAP_GROWTH + 1)
    near = ts[-1] - gap * (MAX_GAP_GROWTH - 1)
    assert events(ts + [far])[-1] == NEW_REQUEST
    assert events(ts + [near])[-1] == NEXT_STEP
    assert events(ts + [far], explicit=True)[-1] == NEXT_STEP, "an explicit request trusts its own schedule"


def test_schedules_of_diffusers_schedulers_are_one_request():
    # Every consecutive change within MAX_GAP_GROWTH of the previous one: none is taken as a new request.
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler)

    schedulers = [
        DDIMScheduler(), DPMSolverMultistepScheduler(use_karras_sigmas=True), EulerDiscreteScheduler(use_karras_sigmas=True),
        EulerDiscreteScheduler(timestep_spacing="trailing"), FlowMatchEulerDiscreteScheduler(shift=3.0),
        HeunDiscreteScheduler(),
    ]
    for scheduler in schedulers:
        for steps in (4, 20, 50):
            scheduler.set_timesteps(steps)
            ts = [float(t) for t in scheduler.timesteps]
            got = events(ts, explicit=True)
            assert NEW_REQUEST not in got[1:] and RESTART not in got, (type(scheduler).__name__, steps)
            bare = events(ts)
            assert NEW_REQUEST not in bare[1:] and bare.count(RESTART) == 1, (type(scheduler).__name__, steps)


def test_heun_repeated_timesteps_are_slots_of_one_step():
    assert events([999, 979, 979, 959, 959], explicit=True) == [NEW_REQUEST, NEXT_STEP, NEXT_SLOT, NEXT_STEP, NEXT_SLOT]


def test_rising_timesteps_are_steps_too():
    # Lumina 2 feeds 1 - t: the schedule rises; the direction is learned from the first change.
    assert events([0.0, 0.1, 0.25, 0.45], explicit=True) == [NEW_REQUEST, NEXT_STEP, NEXT_STEP, NEXT_STEP]
    assert events([0.0, 0.1, 0.25, 0.45, 0.1])[-1] == NEW_REQUEST


def test_calls_without_a_timestep_are_one_step_each():
    assert events([None, None, None]) == [NEW_REQUEST, NEXT_STEP, NEXT_STEP]
    assert events([None, 5.0]) == [NEW_REQUEST, NEW_REQUEST], "a timestep input that appears starts over"


# -- through a compiled model --------------------------------------------------------------

def _model():
    model, inputs, _ = FAMILIES["tiny_dit"]()
    _randomize(model)

    def at(t: float, scale: float = 1.0) -> dict:
        kw = inputs(torch.tensor(float(t)))
        return dict(kw, x=kw["x"] * (scale + t / 700))  # a latent that moves, as in sampling
    return model, at


def _run(model, at, schedule, *, scale=1.0, explicit=False) -> list[torch.Tensor]:
    if explicit:
        model.adacache.new_request()
    with torch.no_grad():
        return [model(**at(t, scale)).clone() for t in schedule]


POLICIES = [adacache.FORA(interval=2), adacache.TaylorSeer(order=1, interval=2), adacache.FirstBlockCache(2.0)]
SCHEDULE = [1000.0, 950.0, 900.0, 850.0, 800.0, 750.0]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("case", ["one_step_then_request", "cancelled_then_lower_start", "txt2img_cut_then_img2img"])
def test_a_request_after_an_unusual_one_equals_the_request_alone(policy, case):
    model, at = _model()
    first, second = {
        # A one-step flow-match request at t=1000, then a normal request from t=1000.
        "one_step_then_request": ([1000.0], SCHEDULE),
        # A request cancelled after two steps, then one that starts far lower.
        "cancelled_then_lower_start": ([999.0, 979.0], [500.0, 480.0, 460.0, 440.0]),
        # Text-to-image interrupted after three steps, then image-to-image from strength 0.6.
        "txt2img_cut_then_img2img": ([1000.0, 950.0, 900.0], [600.0, 550.0, 500.0, 450.0, 400.0]),
    }[case]
    alone = _run(adacache.compile(model, policy), at, second, scale=-1.0)
    cached = adacache.compile(model, policy)
    _run(cached, at, first)
    after = _run(cached, at, second, scale=-1.0)
    assert _same(after, alone), "the second request must not reuse the first one's cache"
    full = _run(model, at, second, scale=-1.0)
    assert not _same(alone, full), "the policy must reuse something, or the test proves nothing"


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_explicit_boundary_covers_what_cannot_be_inferred(policy):
    # A request that continues the previous one's schedule looks like its next step; only an
    # explicit boundary (a pipeline call, a session, new_request) tells them apart.
    model, at = _model()
    second = [900.0, 850.0, 800.0, 750.0]
    alone = _run(adacache.compile(model, policy), at, second, scale=-1.0, explicit=True)
    cached = adacache.compile(model, policy)
    _run(cached, at, [1000.0, 950.0], explicit=True)
    assert _same(_run(cached, at, second, scale=-1.0, explicit=True), alone)
    with adacache.session(cached):
        assert _same(_run(cached, at, second, scale=-1.0), alone), "a session is an explicit boundary too"


def test_bare_loop_computes_its_first_two_steps_and_then_caches():
    model, at = _model()
    cached = adacache.compile(model, adacache.FORA(interval=2))
    _run(cached, at, SCHEDULE)
    sess = cached.adacache.current_session()
    reused = [bool(next(iter(r.reused.values()))) for r in sess.stats.records]
    # Step 1 computes (its caches were restarted), then the explicit request's schedule: reuse at odd steps.
    assert reused == [False, False, False, True, False, True]
    assert [r.step for r in sess.stats.records] == list(range(len(SCHEDULE)))
    assert sess.stats.restarts == 1 and adacache.summary(cached).restarts == 1
    assert "restarted 1" in str(adacache.summary(cached))
    cached.adacache.new_request()
    _run(cached, at, SCHEDULE)
    reused = [bool(next(iter(r.reused.values()))) for r in sess.stats.records]
    assert reused == [False, True, False, True, False, True], "explicit: only the first step computes"


def test_batch_rows_at_different_timesteps_are_refused():
    model, at = _model()
    cached = adacache.compile(model, adacache.FORA(interval=2))
    kw = at(900.0)
    kw["timestep"] = torch.tensor([900.0, 500.0])
    with pytest.raises(adacache.SessionError, match="different timesteps"):
        with torch.no_grad():
            cached(**kw)


def test_total_steps_reach_the_policy():
    from adacache.policies.base import StepContext

    model, at = _model()
    seen: list[StepContext] = []
    cached = adacache.compile(model, adacache.FORA(interval=2))
    runtime = cached.adacache
    original = runtime.step_inputs.controls

    def spy(program, ctx, device):
        seen.append(ctx)
        return original(program, ctx, device)

    runtime.step_inputs.controls = spy
    runtime.new_request(total_steps=3)
    _run(cached, at, SCHEDULE[:3])
    _run(cached, at, SCHEDULE[3:5])  # past the announced length: another (inferred) request
    assert [c.total_steps for c in seen] == [3, 3, 3, None, None]
    assert cached.adacache.current_session().stats.generations == 2


def _pattern(records) -> list[bool]:
    return [any(bool(flag) for flag in r.reused.values()) for r in records]


def test_an_end_anchored_schedule_ends_on_a_full_step_where_the_length_is_known(tmp_path):
    # Issue 31: FORA(interval=3) anchored to the end of a 5-step request computes steps 4 and 1
    # (and 0, whose caches are empty); of unknown length it counts from the start (0 and 3).
    model, at = _model()
    cached = adacache.compile(model, adacache.FORA(interval=3, anchor="end"))
    schedule = SCHEDULE[:5]
    cached.adacache.new_request(total_steps=5)
    announced = _run(cached, at, schedule)
    sess = cached.adacache.current_session()
    assert _pattern(sess.stats.records) == [False, False, True, True, False]
    cached.adacache.new_request()
    with pytest.warns(adacache.RequestBoundaryWarning, match="did not announce its length"):
        _run(cached, at, schedule)
    assert _pattern(sess.stats.records) == [False, True, True, False, True]
    # The engine decides the same from the length its request announces, and ends the request there.
    pytest.importorskip("onnxruntime")
    engine = adacache.load(adacache.export(cached, tmp_path / "fora", example_inputs=((), at(schedule[0]))), provider="cpu")
    assert engine.manifest["schedules"][next(iter(engine.manifest["schedules"]))]["anchor"] == "end"
    engine.new_request(total_steps=5)
    reused = []
    for t, expected in zip(schedule, announced):
        before = sum(engine.reused.values())
        out = engine(**{k: v.numpy() for k, v in at(t).items()})["output_0"]
        reused.append(sum(engine.reused.values()) > before)
        assert abs(out - expected.numpy()).max() < 1e-4
    assert reused == [False, False, True, True, False]
    engine(**{k: v.numpy() for k, v in at(SCHEDULE[5]).items()})
    assert engine.tracker.step == 0 and not engine.tracker.explicit, "past its announced length the request ended"


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "50"])
def test_a_step_count_that_is_not_one_is_refused(bad, tmp_path):
    model, at = _model()
    cached = adacache.compile(model, adacache.FORA(interval=2))
    with pytest.raises(adacache.InputError, match="total_steps must be the number of steps"):
        cached.adacache.new_request(total_steps=bad)


# -- the property: reuse only ever from the same request ----------------------------------

@st.composite
def request_sequences(draw):
    """Requests of 1-5 steps, 1 or 2 calls per step, each with or without an explicit boundary
    (announcing its length or not).

    Without an explicit boundary, a request is made detectable as the tracker documents: it
    follows a request of announced length, or starts above where the previous one ended, or
    far below it (beyond MAX_GAP_GROWTH of the previous spacing), or follows a one-step
    inferred request. After an explicit request of unknown length only a start above a
    schedule of two or more steps is recognised; after a one-step one, nothing. A start at
    the previous call's own timestep is that call's next slot, never detectable. A one-step
    request told apart only as the restart of a one-step request before it continues that
    request's schedule (the restart learned its direction), so what follows it is explicit.
    """
    requests = []
    previous = None  # (schedule, spacing, explicit, announced)
    restarted = False  # the previous request was told apart only as a restart of the one before it
    for _ in range(draw(st.integers(2, 4))):
        # The first is explicit: each example starts with new_request() on a shared compiled model.
        explicit = (previous is None or draw(st.booleans()) or (previous[2] and not previous[3] and len(previous[0]) == 1)
                    or (restarted and len(previous[0]) == 1))
        after_one_step = previous is not None and not explicit and not previous[3] and len(previous[0]) == 1 and not previous[2]
        announced = explicit and draw(st.booleans())
        length = draw(st.integers(1, 5))
        spacing = float(draw(st.sampled_from([10, 25, 50])))
        if previous is None or explicit or previous[3] or (len(previous[0]) == 1 and not previous[2]):
            start = float(draw(st.integers(300, 1000)))
            if not explicit and previous is not None and start == previous[0][-1]:
                start += 1.0  # the previous call's timestep again is its next slot: not detectable (see the docstring)
        elif previous[2] or draw(st.booleans()):
            start = previous[0][-1] + float(draw(st.integers(1, 500)))
        else:
            start = previous[0][-1] - previous[1] * (MAX_GAP_GROWTH + 1) - float(draw(st.integers(0, 50)))
        schedule = [start - i * spacing for i in range(length)]
        calls_per_step = draw(st.sampled_from([1, 2]))
        requests.append((explicit, announced, schedule, calls_per_step))
        previous = (schedule, spacing, explicit, announced)
        restarted = after_one_step
    return requests


_PROPERTY_MODEL = _model()
_PROPERTY_COMPILED: dict[int, torch.nn.Module] = {}  # captured once: the examples differ in calls only


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=request_sequences(), policy_index=st.sampled_from([0, 1]))
def test_no_call_reuses_a_cache_from_another_request(requests, policy_index):
    model, at = _PROPERTY_MODEL
    cached = _PROPERTY_COMPILED.setdefault(policy_index, adacache.compile(model, POLICIES[policy_index]))
    explicit, announced, schedule, _ = requests[0]
    cached.adacache.new_request(total_steps=len(schedule) if announced else None)  # nothing from the previous example
    session = cached.adacache.current_session()
    filled_by: dict[int, int] = {}  # slot -> the request whose call last computed its cache
    with torch.no_grad():
        for request_id, (explicit, announced, schedule, calls_per_step) in enumerate(requests):
            if explicit and request_id > 0:
                cached.adacache.new_request(total_steps=len(schedule) if announced else None)
            for t in schedule:
                for call in range(calls_per_step):
                    cached(**at(t, scale=1.0 + call))
                    record = session.stats.records[-1]
                    reused = any(bool(flag) for flag in record.reused.values())
                    if reused:
                        assert filled_by.get(record.slot) == request_id, (
                            f"request {request_id} at t={t} reused slot {record.slot} filled by request {filled_by.get(record.slot)}"
                        )
                    else:
                        filled_by[record.slot] = request_id


def test_a_failed_call_takes_no_step():
    model, at = _model()
    cached = adacache.compile(model, adacache.FORA(interval=2))
    cached.adacache.new_request()
    bad = dict(at(1000.0), x=torch.zeros(2, 3, 8, 8))  # wrong channel count: the model raises
    with torch.no_grad(), pytest.raises(Exception):
        cached(**bad)
    _run(cached, at, SCHEDULE[:3])
    steps = [(r.step, r.slot) for r in cached.adacache.current_session().stats.records]
    assert steps == [(0, 0), (1, 0), (2, 0)], "the retry is the request's first call, not a second slot"


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "inferred"])
def test_rising_timesteps_reuse_like_falling_ones(explicit):
    """Lumina 2 and Lumina-Next pass 1 - t / 1000, which rises over the denoising: each call
    must be the next step (and reuse), not a new request."""
    model, at = _model()
    cached = adacache.compile(model, adacache.FORA(interval=2))
    rising = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    _run(cached, at, rising, explicit=explicit)
    stats = cached.adacache.current_session().stats
    assert stats.generations == 1 and [r.step for r in stats.records] == list(range(6)), "a restart keeps the step count"
    assert any(bool(flag) for r in stats.records for flag in r.reused.values())


# -- the property, with shapes, batches, mixed rows, resets and sessions -------------------

def _rows(kw: dict, batch: int) -> dict:
    return {k: v[:batch] for k, v in kw.items()}


ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("step"), st.sampled_from([1, 2])),
        st.tuples(st.just("repeat"), st.sampled_from([1, 2])),  # the same timestep again (CFG's second call)
        st.tuples(st.just("mixed_rows"), st.just(2)),
        st.tuples(st.just("reset"), st.just(0)),
        st.tuples(st.just("session"), st.integers(1, 3)),  # that many steps in a fresh session
    ),
    min_size=3, max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=ACTIONS, policy_index=st.sampled_from([0, 1]))
def test_no_call_reuses_a_cache_of_another_request_or_another_shape(actions, policy_index):
    """A small reference model of what must happen: a reuse reads a cache that the same
    session filled in the same request, from a call of the same batch size."""
    model, at = _PROPERTY_MODEL
    cached = _PROPERTY_COMPILED.setdefault(policy_index, adacache.compile(model, POLICIES[policy_index]))
    runtime = cached.adacache
    runtime.new_request()
    state = {"request": 0, "t": 1000.0, "started": False}
    filled: dict[tuple[int, int], tuple[int, int]] = {}  # (session, slot) -> (request, batch)
    sessions = 0  # inner sessions so far; the main one is 0

    def call(t: float, batch: int, session: Any, session_id: int, request: int) -> None:
        before = len(session.stats.records)
        cached(**_rows(at(t), batch))
        assert len(session.stats.records) == before + 1
        record = session.stats.records[-1]
        if any(bool(flag) for flag in record.reused.values()):
            assert filled.get((session_id, record.slot)) == (request, batch), (
                f"t={t} batch={batch} reused slot {record.slot} filled by {filled.get((session_id, record.slot))}"
            )
        else:
            filled[(session_id, record.slot)] = (request, batch)

    with torch.no_grad():
        main = runtime.current_session()
        for kind, arg in actions:
            if kind == "reset":
                runtime.reset()
                state.update(request=state["request"] + 1, t=1000.0, started=False)
            elif kind in ("step", "repeat"):
                if kind == "step" or not state["started"]:
                    state["t"] -= 50.0
                state["started"] = True
                call(state["t"], arg, main, 0, state["request"])
            elif kind == "mixed_rows":
                before = len(main.stats.records)
                kw = at(state["t"] - 50.0)
                kw["timestep"] = torch.tensor([state["t"] - 50.0, 1000.0])
                with pytest.raises(adacache.SessionError, match="different timesteps"):
                    cached(**kw)
                assert len(main.stats.records) == before, "a refused call takes no step"
            else:  # a fresh session: its own request, its own caches; the main one is untouched
                sessions += 1
                with runtime.session() as inner:
                    for i in range(arg):
                        call(1000.0 - 50.0 * (i + 1), 2, inner, sessions, 0)


# -- a timestep input under another name --------------------------------------------------

class _NoiseLevelModel(torch.nn.Module):
    """The tiny DiT behind a forward whose timestep input is called ``noise_level``."""

    def __init__(self, dit: torch.nn.Module) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.dit(x=x, timestep=noise_level, class_labels=class_labels)


def _cfg_request(compiled, inputs, name: str) -> list[torch.Tensor]:
    """CFG as two calls per step (the uncond call with another latent), one explicit request."""
    out = []
    compiled.adacache.new_request()
    with torch.no_grad():
        for t in (999.0, 979.0, 959.0, 939.0, 919.0, 899.0):
            kw = inputs(torch.tensor(t))
            timestep = kw.pop("timestep")
            for scale in (1.0, 0.5):
                out.append(compiled(**dict(kw, x=kw["x"] * scale), **{name: timestep}))
    return out


def test_a_timestep_input_under_another_name_can_be_named_and_is_warned_about_otherwise():
    """Issue 28, cause 6: with ``noise_level`` unrecognised, every call counted as a step and
    the uncond call reused the cond call's features (1.2-2.5 off), without a word."""
    from families import FAMILIES

    dit, inputs, _ = FAMILIES["tiny_dit"]()
    policy = adacache.FORA(interval=2)
    expected = _cfg_request(adacache.compile(dit, policy), inputs, "timestep")
    named = adacache.compile(_NoiseLevelModel(dit), policy, timestep_arg="noise_level")
    with warnings.catch_warnings():
        warnings.simplefilter("error", adacache.TimestepWarning)
        got = _cfg_request(named, inputs, "noise_level")
    assert all(torch.equal(a, b) for a, b in zip(got, expected))

    unnamed = adacache.compile(_NoiseLevelModel(dit), policy)
    with pytest.warns(adacache.TimestepWarning, match="timestep_arg='noise_level'"):
        wrong = _cfg_request(unnamed, inputs, "noise_level")
    assert not all(torch.equal(a, b) for a, b in zip(wrong, expected)), "the hazard the warning is about"
    with warnings.catch_warnings():
        warnings.simplefilter("error", adacache.TimestepWarning)
        _cfg_request(unnamed, inputs, "noise_level")  # once per model

    with pytest.raises(adacache.PolicyError, match="not an input of _NoiseLevelModel.forward"):
        adacache.compile(_NoiseLevelModel(dit), policy, timestep_arg="sigma_level")
