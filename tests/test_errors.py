"""Bad input gets an error that says what was wrong and what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adacache
from families import FAMILIES


class NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent Python control flow: not traceable
            return x * 2
        return x


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8)])
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.blocks[0](x))


class NotResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 4), nn.Linear(4, 8)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_model_without_blocks_says_what_was_searched():
    cached = adacache.compile(NoBlocks(), adacache.FORA())
    with pytest.raises(adacache.NotEligibleError) as info:
        cached(torch.randn(2, 8))
    message = str(info.value)
    assert "transformer_blocks" in message and "blocks=" in message


def test_blocks_whose_outputs_are_not_residual_are_rejected_with_reason():
    cached = adacache.compile(NotResidual(), adacache.FORA())
    with pytest.raises(adacache.NotEligibleError, match="not a residual block"):
        cached(torch.randn(2, 8))


def test_capture_failure_keeps_the_diagnostic_and_names_the_module():
    cached = adacache.compile(Branchy(), adacache.FORA(), capture="graph")
    with pytest.raises(adacache.CaptureError) as info:
        cached(torch.randn(2, 8))
    message = str(info.value)
    assert "Branchy.gate on inputs" in message, "the submodule running the line is named"
    assert "float32[2, 8]" in message, "the inputs are described"
    assert info.value.__cause__ is not None, "the exporter's exception is chained"


class Packed(nn.Module):
    """Packs rows to their own lengths, as Lumina2 packs captions (``mask.sum(1).tolist()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1).tolist()
        if len(set(lengths)) > 1:
            x = x * mask
        return x + self.blocks[0](x)


class Reshaping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.blocks[0](x).view(3, -1, 8)[0]


def _line_of(code: str) -> int:
    with open(__file__) as source:
        return next(number for number, line in enumerate(source, start=1) if code in line)


@pytest.mark.parametrize("model, inputs, line, module", [
    (Branchy(), (torch.randn(2, 8),), "if x.sum() > 0", "gate"),
    (Packed(), (torch.randn(2, 8), torch.ones(2, 8)), "if len(set(lengths)) > 1", ""),
])
def test_a_data_dependent_line_is_named_with_its_code_and_what_applies(model, inputs, line, module):
    cached = adacache.compile(model, adacache.FORA(), capture="graph")
    with pytest.raises(adacache.CaptureError) as info:
        cached(*inputs)
    error = info.value
    assert error.source is not None and error.source.file == __file__
    assert error.source.line == _line_of(line) and line in error.source.code
    assert f"{__file__}:{error.source.line}" in str(error) and line in str(error)
    assert error.module == module and error.data_dependent
    assert "reads a tensor's value" in str(error), "the option that applies to a data-dependent line"
    assert "example_inputs" not in str(error), "no input size avoids a data-dependent line"


def test_a_shape_failure_points_at_the_line_and_suggests_the_served_size_at_compile_time():
    with pytest.raises(adacache.CaptureError) as info:
        adacache.compile(Reshaping(), adacache.FORA(), example_inputs=((torch.randn(2, 8),), {}), capture="graph")
    error = info.value
    assert error.source is not None and ".view(3, -1, 8)" in error.source.code
    assert not error.data_dependent and "example_inputs=" in str(error)


class GatedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # inside the block: capturing the block alone fails the same way
            return x + self.proj(x)
        return x


class GatedBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([GatedBlock(), GatedBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_auto_capture_that_fails_in_both_modes_says_so_with_the_line():
    cached = adacache.compile(GatedBlocks(), adacache.FORA())
    with pytest.raises(adacache.CaptureError) as info, torch.no_grad():
        cached(torch.ones(2, 8))
    message = str(info.value)
    assert "GatedBlocks.blocks.0" in message and "if x.sum() > 0" in message
    assert "capture='blocks' (tried because capture='auto') failed too" in message


def test_pattern_that_matches_nothing():
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, adacache.FORA(), blocks="decoder.*")
    with pytest.raises(adacache.NotEligibleError, match="matching 'decoder.\\*'"):
        cached(**inputs(torch.tensor(10.0)))


def test_first_block_cache_needs_blocks_to_cache():
    model, inputs, _ = FAMILIES["tiny_dit"]()
    cached = adacache.compile(model, adacache.FirstBlockCache(0.1, probe_blocks=3, tail_blocks=1))
    with pytest.raises(adacache.PolicyError, match="leaves no block"):
        cached(**inputs(torch.tensor(10.0)))


def test_wrong_arguments_to_compile():
    model, _, _ = FAMILIES["tiny_dit"]()
    with pytest.raises(TypeError, match="policy must be"):
        adacache.compile(model, "fora")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nn.Module"):
        adacache.compile(lambda x: x, adacache.FORA())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        adacache.compile(model, adacache.FORA(), backend="tvm")
