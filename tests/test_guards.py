"""Guards: a compiled model never runs a graph captured from a model that has since changed.

Each test changes the model after its first request the way users do (PEFT / diffusers LoRA,
attention processors, ``load_state_dict(assign=True)``, train/eval, dtype, replaced
submodules) and checks that the next request equals the uncompiled model with the same
change, that the change was noticed (a recapture with its reason), and that nothing is
captured again when nothing changed.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import adacache
from families import FAMILIES

pytest.importorskip("diffusers")
T1, T2 = torch.tensor(900.0), torch.tensor(850.0)


def _sd3():
    model, inputs, _ = FAMILIES["sd3"]()
    return model, inputs


def _request(model, inputs, dtype=None) -> list[torch.Tensor]:
    """One explicit request of two steps; the outputs."""
    runtime = getattr(type(model), "adacache", None)
    if runtime is not None:
        runtime.new_request()
    outs = []
    with torch.no_grad():
        for t in (T1, T2):
            kw = inputs(t)
            if dtype is not None:
                kw = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items()}
            outs.append(model(**kw).sample.clone())
    return outs


def _check(compiled, plain, inputs, *, reason: str | None, dtype=None) -> None:
    got, want = _request(compiled, inputs, dtype), _request(plain, inputs, dtype)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), "the compiled model must follow the change"
    recaptures = compiled.adacache.recaptures
    if reason is None:
        assert not recaptures, f"nothing structural changed, yet captured again: {recaptures}"
    else:
        assert recaptures and re.search(reason, recaptures[-1].reason), recaptures
        assert recaptures[-1].reason in str(adacache.summary(compiled)), "the summary says why"


def _lora(model, name="a", rank=2):
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False), adapter_name=name)


def _compiled_after_one_request(policy=None):
    model, inputs = _sd3()
    compiled = adacache.compile(model, policy or adacache.NoCache())
    before = _request(compiled, inputs)
    return model, inputs, compiled, before


def test_nothing_changed_means_one_capture():
    model, inputs, compiled, before = _compiled_after_one_request()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(_request(compiled, inputs), before))
    assert compiled.adacache.recaptures == [] and len(compiled.adacache.programs) == 1


def test_peft_adapter_added_after_compile_is_used():
    pytest.importorskip("peft")
    model, inputs, compiled, before = _compiled_after_one_request()
    _lora(model)
    _check(compiled, model, inputs, reason="lora")
    assert not torch.equal(_request(compiled, inputs)[0], before[0]), "the adapter must change the output"


def test_adapter_weights_disable_enable_and_delete_are_followed():
    pytest.importorskip("peft")
    model, inputs = _sd3()
    _lora(model, "a")
    _lora(model, "b")
    compiled = adacache.compile(model, adacache.NoCache())
    _request(compiled, inputs)
    model.set_adapters(["a", "b"], weights=[0.5, 1.5])
    _check(compiled, model, inputs, reason="scaling")
    model.disable_adapters()
    _check(compiled, model, inputs, reason="disable")
    model.enable_adapters()
    _check(compiled, model, inputs, reason="disable")
    model.delete_adapters("b")
    _check(compiled, model, inputs, reason="lora")


def test_fuse_and_unfuse_lora_are_followed():
    pytest.importorskip("peft")
    model, inputs = _sd3()
    _lora(model, "a")
    compiled = adacache.compile(model, adacache.NoCache())
    _request(compiled, inputs)
    model.fuse_lora()
    _check(compiled, model, inputs, reason="lora_scale|merged")
    model.unfuse_lora()
    _check(compiled, model, inputs, reason="merged")


class _HalfAttention:
    """An attention processor that halves its outputs: a visible change."""

    def __init__(self) -> None:
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        self.inner = JointAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)
        return tuple(o * 0.5 for o in out) if isinstance(out, tuple) else out * 0.5


class _ScaledAttention(_HalfAttention):
    """A processor with a plain setting its ``__call__`` reads (as IP-Adapter's ``scale``)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)
        return tuple(o * self.scale for o in out) if isinstance(out, tuple) else out * self.scale


def test_attention_processor_set_after_compile_is_used():
    model, inputs, compiled, before = _compiled_after_one_request()
    model.set_attn_processor(_HalfAttention())
    _check(compiled, model, inputs, reason="processor")
    assert not torch.equal(_request(compiled, inputs)[0], before[0])


def test_load_state_dict_with_assign_is_used():
    model, inputs, compiled, _ = _compiled_after_one_request()
    other, _ = _sd3()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.25)
    model.load_state_dict(other.state_dict(), assign=True)
    _check(compiled, model, inputs, reason="replaced")


def test_in_place_weight_edits_are_seen_without_capturing_again():
    model, inputs, compiled, before = _compiled_after_one_request()
    with torch.no_grad():
        model.transformer_blocks[0].attn.to_q.weight.mul_(2.0)
        model.proj_out.weight.data.copy_(model.proj_out.weight * 0.5)
    _check(compiled, model, inputs, reason=None)
    assert not torch.equal(_request(compiled, inputs)[0], before[0])


def test_train_eval_switch_captures_again():
    model, inputs, compiled, _ = _compiled_after_one_request()
    model.train()
    _check(compiled, model, inputs, reason="training")


def test_dtype_change_is_followed():
    # Inputs of the new dtype are a new signature: a program of their own, captured from the
    # converted model; the float32 program is not used for them.
    model, inputs, compiled, _ = _compiled_after_one_request()
    model.to(torch.float64)
    _check(compiled, model, inputs, reason=None, dtype=torch.float64)
    assert [p.captured.signature.describe().count("float64") > 0 for p in compiled.adacache.programs] == [False, True]


def test_replaced_submodule_is_used():
    model, inputs, compiled, before = _compiled_after_one_request()
    block = copy.deepcopy(model.transformer_blocks[1])
    with torch.no_grad():
        for p in block.parameters():
            p.mul_(-1.0)
    model.transformer_blocks[1] = block
    _check(compiled, model, inputs, reason="transformer_blocks.1")
    assert not torch.equal(_request(compiled, inputs)[0], before[0])


def test_adapter_added_in_the_middle_of_a_request_is_used_at_the_next_call():
    # Registering modules bumps a process-wide counter that every call compares: the change
    # is seen at once, not only at the next request.
    pytest.importorskip("peft")
    model, inputs = _sd3()
    compiled = adacache.compile(model, adacache.NoCache())
    compiled.adacache.new_request()
    with torch.no_grad():
        compiled(**inputs(T1))
        _lora(model)
        got = compiled(**inputs(T2)).sample
        want = model(**inputs(T2)).sample
    assert torch.equal(got, want)


def test_caching_policy_after_a_change_equals_a_fresh_compile_of_the_changed_model():
    pytest.importorskip("peft")
    policy = adacache.FORA(interval=2)
    model, inputs, compiled, _ = _compiled_after_one_request(policy)
    _lora(model)
    model.set_adapters(["a"], weights=[0.7])
    fresh = adacache.compile(model, policy)
    assert all(torch.equal(a, b) for a, b in zip(_request(compiled, inputs), _request(fresh, inputs)))
    assert compiled.adacache.recaptures


def test_compiled_view_shares_state_and_uncompile_gives_the_model_back():
    model, inputs = _sd3()
    compiled = adacache.compile(model, adacache.NoCache())
    assert isinstance(compiled, type(model)) and type(model) is not type(compiled)
    assert compiled.transformer_blocks is model.transformer_blocks
    assert adacache.uncompile(compiled) is model
    assert not hasattr(type(model), "adacache"), "the model passed in is not changed"
    twin = copy.deepcopy(compiled)
    assert isinstance(twin, adacache.CachedModule) and twin.adacache is not compiled.adacache
    assert twin.transformer_blocks[0].attn.to_q.weight is not model.transformer_blocks[0].attn.to_q.weight
    with pytest.raises(TypeError, match="pickle"):
        import pickle

        pickle.dumps(compiled)
    with pytest.raises(TypeError, match="already compiled"):
        adacache.compile(compiled, adacache.NoCache())


@pytest.mark.parametrize("change", ["fuse_lora", "set_adapters", "disable_adapters", "set_attn_processor",
                                    "processor_setting", "train"])
def test_a_change_in_the_middle_of_a_request_is_seen_at_the_next_call(change):
    """A step callback that changes the model without registering anything: the very next
    call follows it (fusing would otherwise apply the LoRA twice: merged weights and branch)."""
    pytest.importorskip("peft")
    model, inputs = _sd3()
    _lora(model, "a")
    _lora(model, "b")
    processor = _ScaledAttention()
    if change == "processor_setting":
        model.set_attn_processor(processor)
    compiled = adacache.compile(model, adacache.NoCache())
    compiled.adacache.new_request()
    with torch.no_grad():
        compiled(**inputs(T1))
        if change == "fuse_lora":
            model.fuse_lora()
        elif change == "set_adapters":
            model.set_adapters(["a", "b"], weights=[0.3, 1.7])
        elif change == "disable_adapters":
            model.disable_adapters()
        elif change == "set_attn_processor":
            model.set_attn_processor(_HalfAttention())
        elif change == "processor_setting":  # an IP-Adapter scale schedule in a step callback
            processor.scale = 0.25
        else:
            model.train()
        got = compiled(**inputs(T2)).sample
        want = model(**inputs(T2)).sample
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), float((got - want).abs().max())
    assert compiled.adacache.recaptures
