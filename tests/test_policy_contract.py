"""The contract every registered policy keeps, on every test model family (issue 29, stage 6).

Parametrized over ``adacache.policies.POLICIES``: a method added to the registry is tested
here without a line in this file. Each policy, in its default configuration (calibrated
first where compiling says it must be):

* compiles and runs a short denoising loop, or refuses the family with an adacache error
  that names it (and it runs on the plain DiT families in any case);
* skips what it says it skips: a call the statistics record as reusing a site runs fewer
  attention kernels than full computation, and a call that reuses nothing runs all of them;
  a policy that proposes reuse reuses somewhere on these close steps;
* ``describe()`` parses back to an equal policy (the command line's expressions);
* exports to ONNX where its ``backends`` say it can, and otherwise refuses with an
  ``ExportError`` that names it.
"""

from __future__ import annotations

import functools

import pytest
import torch

import adacache
import adacache.policies
from adacache.errors import AdaCacheError
from adacache.policies.parse import parse_policy
from families import FAMILIES
from helpers import CountAttention, output_tensor

POLICIES = sorted(adacache.policies.POLICIES)
TIMESTEPS = torch.linspace(600, 599, 6)  # close steps, so that change-gated policies find reuse on random weights
#: Families every policy must run on (the others may refuse, clearly).
MUST_RUN = ("tiny_dit", "diffusers_dit")


def _drifting(inputs):
    """The family's inputs with a latent that drifts a little from step to step, as late in
    sampling, so that policies gated on the change have something to reuse."""
    def step(t):
        kw = inputs(t)
        key = "x" if "x" in kw else "hidden_states"
        return dict(kw, **{key: kw[key] * (1 + t / 5000)})
    return step


def _loop(model, inputs):
    for t in TIMESTEPS:
        model(**inputs(t))


def _compiled(name: str, family: str):
    """The policy's default configuration compiled for the family; calibrated first when the
    compile refuses it for want of calibration (the error says so)."""
    model, inputs, _ = FAMILIES[family]()
    inputs = _drifting(inputs)
    policy = getattr(adacache.policies, name)()
    try:
        return adacache.compile(model, policy), model, inputs, policy
    except adacache.PolicyError as exc:
        if not (policy.calibratable and "calibrate" in str(exc)):
            raise
    with torch.no_grad():
        policy = adacache.calibrate(model, policy, lambda denoiser: _loop(denoiser, inputs))
    return adacache.compile(model, policy), model, inputs, policy


def _attention_kernels(model, inputs) -> list[int]:
    counts = []
    with torch.no_grad():
        for t in TIMESTEPS:
            with CountAttention() as counter:
                model(**inputs(t))
            counts.append(counter.count)
    return counts


@functools.lru_cache(maxsize=None)
def _full_computation(family: str) -> tuple[int, ...]:
    """Attention kernels per step of the family's compiled graph with nothing cached."""
    model, inputs, _ = FAMILIES[family]()
    return tuple(_attention_kernels(adacache.compile(model, adacache.NoCache()), _drifting(inputs)))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", POLICIES)
def test_runs_and_skips_what_it_says(name, family):
    try:
        compiled, model, inputs, policy = _compiled(name, family)
        full = _full_computation(family)
        compiled.adacache.new_request(total_steps=len(TIMESTEPS))
        cached = _attention_kernels(compiled, inputs)
    except AdaCacheError as exc:
        assert family not in MUST_RUN, f"{name} must run on {family}: {exc}"
        assert name in str(exc), f"the refusal does not name the policy: {exc}"
        return
    rows = adacache.summary(compiled).per_step
    assert len(rows) == len(TIMESTEPS)
    for step, (row, count, reference) in enumerate(zip(rows, cached, full)):
        if any(row["reused"].values()):
            assert count < reference, f"step {step}: reported reuse of {row['reused']} but ran {count} of {reference} attention kernels"
        else:
            assert count == reference, f"step {step}: reported no reuse but ran {count} of {reference} attention kernels"
    if policy.proposes_reuse:  # ... and on these close steps every caching method finds something to reuse
        assert any(any(row["reused"].values()) for row in rows), f"{policy.describe()} reused nothing on {family}"
    assert parse_policy(policy.describe()) == policy


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", POLICIES)
def test_exports_where_it_says_it_can(name, family, tmp_path):
    compiled, _, inputs, policy = _compiled(name, family)
    example = ((), inputs(TIMESTEPS[0]))
    if "onnx" not in policy.backends:
        with pytest.raises(adacache.ExportError, match=f"{name} cannot be exported to onnx"):
            adacache.export(compiled, tmp_path / "artifact", example_inputs=example, precision="fp32")
        return
    pytest.importorskip("onnxruntime")
    artifact = adacache.export(compiled, tmp_path / "artifact", example_inputs=example)
    engine = adacache.load(artifact, provider="cpu")
    assert engine.manifest["policy"]["policy"] == name
    compiled.adacache.new_request(total_steps=len(TIMESTEPS))
    engine.new_request()
    with torch.no_grad():
        for t in TIMESTEPS:  # the engine decides and computes as the compiled model does
            feeds = inputs(t)
            expected = output_tensor(compiled(**feeds)).numpy()
            got = engine(**{k: v.numpy() for k, v in feeds.items()})["output_0"]
            assert abs(got - expected).max() < 1e-4, f"timestep {float(t)}"
    rows = adacache.summary(compiled).per_step
    per_site = {site: sum(bool(row["reused"][site]) for row in rows) for site in rows[0]["reused"]}
    assert {site: n for site, n in engine.reused.items() if n} == {site: n for site, n in per_site.items() if n}


@pytest.mark.parametrize("name", POLICIES)
def test_blocks_mode_decides_and_computes_as_the_whole_graph(name):
    """capture="blocks" (issue 14) on a model whose blocks form one run: the policy plans
    the same sites, makes the same decisions at every step and computes the same outputs as
    with whole-graph capture (replays, forecasts, gates and offset scores included)."""
    graph, _, inputs, policy = _compiled(name, "tiny_dit")
    blocks = adacache.compile(adacache.uncompile(graph), policy, capture="blocks")
    outputs, reuse = {}, {}
    with torch.no_grad():
        for mode, compiled in (("graph", graph), ("blocks", blocks)):
            compiled.adacache.new_request(total_steps=len(TIMESTEPS))
            outputs[mode] = [output_tensor(compiled(**inputs(t))) for t in TIMESTEPS]
            reuse[mode] = [any(row["reused"].values()) for row in adacache.summary(compiled).per_step]
    assert blocks.adacache.programs[0].mode == "blocks"
    assert reuse["blocks"] == reuse["graph"]
    for step, (a, b) in enumerate(zip(outputs["blocks"], outputs["graph"])):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"step {step}: {float((a - b).abs().max())}"


def _decisions(model, inputs, engine=None) -> tuple[list[int], list[bool], list[torch.Tensor]]:
    """Run the loop as a user's bare loop (no request announced) and return each call's
    step, whether it reused anything, and its output; through ``engine`` when given."""
    steps, reused, outputs = [], [], []
    with torch.no_grad():
        for t in TIMESTEPS:
            feeds = inputs(t)
            if engine is None:
                outputs.append(output_tensor(model(**feeds)))
                record = model.adacache.current_session().stats.records[-1]
                steps.append(record.step)
                reused.append(any(bool(flag) for flag in record.reused.values()))
            else:
                before = sum(engine.reused.values())
                outputs.append(torch.from_numpy(engine(**{k: v.numpy() for k, v in feeds.items()})["output_0"]))
                steps.append(engine.tracker.step)
                reused.append(sum(engine.reused.values()) > before)
    return steps, reused, outputs


@pytest.mark.parametrize("name", POLICIES)
def test_a_bare_loop_decides_as_an_explicit_request(name, tmp_path):
    """Issue 31: a loop that announces no request restarts its caches at its first change of
    timestep (the call before may have been another request) but keeps the step count, so
    every call has the step an explicit request gives it. Where the host's schedule alone
    decides (no in-graph score), the reuse pattern is the explicit request's at every step
    but the restarted one, which computes; the exported engine does the same."""
    compiled, model, inputs, policy = _compiled(name, "tiny_dit")
    bare = adacache.compile(model, policy)
    compiled.adacache.new_request()  # explicit, of unknown length like the bare loop
    explicit_steps, explicit_reused, explicit_out = _decisions(compiled, inputs)
    bare_steps, bare_reused, bare_out = _decisions(bare, inputs)
    assert bare_steps == explicit_steps == list(range(len(TIMESTEPS)))
    assert bare.adacache.current_session().stats.restarts == 1
    assert not bare_reused[1], "the restarted step has empty caches: it computes"
    assert torch.equal(bare_out[0], explicit_out[0])
    scheduled = not any(spec.kind == "score" for spec in bare.adacache.programs[0].layout.signals)
    if scheduled:
        assert bare_reused[2:] == explicit_reused[2:], (bare_reused, explicit_reused)
        assert bare_reused[0] == explicit_reused[0]
    if "onnx" not in policy.backends:
        return
    pytest.importorskip("onnxruntime")
    artifact = adacache.export(bare, tmp_path / "artifact", example_inputs=((), inputs(TIMESTEPS[0])))
    engine = adacache.load(artifact, provider="cpu")
    engine_steps, engine_reused, engine_out = _decisions(None, inputs, engine)
    assert engine_steps == bare_steps and engine_reused == bare_reused
    for step, (a, b) in enumerate(zip(engine_out, bare_out)):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), f"step {step}: {float((a - b).abs().max())}"
