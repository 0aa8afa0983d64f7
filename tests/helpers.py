"""Shared test utilities: a denoising loop, and counting how often attention runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output (tensor, tuple, or diffusers output dataclass)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


def new_request(model: Any) -> None:
    """Mark the start of a request on a compiled model (a plain model has nothing to mark)."""
    runtime = getattr(type(model), "adacache", None)
    if runtime is not None:
        runtime.new_request()


def denoise(model: torch.nn.Module, inputs: Callable[[torch.Tensor], dict[str, Any]], steps: int = 8) -> list[torch.Tensor]:
    """Call ``model`` over a decreasing timestep schedule, as one request; return every
    step's output.

    The inputs do not depend on earlier outputs, so a cached and an uncached run see the
    same inputs at every step and their outputs can be compared step by step.
    """
    new_request(model)
    outs = []
    with torch.no_grad():
        for t in torch.linspace(950, 50, steps):
            outs.append(output_tensor(model(**inputs(t))).clone())
    return outs


def moving(inputs: Callable[[torch.Tensor], dict[str, Any]]) -> Callable[[torch.Tensor], dict[str, Any]]:
    """The family's inputs with a latent that moves from step to step, as in sampling (the
    offset score and data-dependent gates read the change, which a constant latent leaves still)."""
    def step(t: torch.Tensor) -> dict[str, Any]:
        kw = inputs(t)
        key = "x" if "x" in kw else "hidden_states"
        return dict(kw, **{key: kw[key] * (1 + t / 500)})
    return step


class CountAttention(TorchDispatchMode):
    """Counts attention kernels executed: one per transformer block (or attention module) run."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__ or func.__name__.startswith("_softmax") or func.__name__.startswith("softmax"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def assert_onnx_matches_eager(cached: torch.nn.Module, inputs: Callable[[torch.Tensor], dict[str, Any]], timesteps: torch.Tensor, directory: Any, atol: float = 1e-4) -> Any:
    """Export ``cached``, run the artifact with ONNX Runtime next to the eager model over
    ``timesteps``, and check every step's output; return the engine for further checks."""
    import adacache

    adacache.export(cached, directory, example_inputs=((), inputs(timesteps[0])))
    engine = adacache.load(directory, provider="cpu")
    new_request(cached)
    engine.new_request()
    with torch.no_grad():
        for t in timesteps:
            feeds = inputs(t)
            expected = cached(**feeds).numpy()
            got = engine(**{k: v.numpy() for k, v in feeds.items()})["output_0"]
            assert abs(got - expected).max() < atol, f"timestep {float(t)}"
    return engine


def run_against_reference(cached: torch.nn.Module, inputs: Callable[[torch.Tensor], dict[str, Any]], timesteps: torch.Tensor, expected: list[torch.Tensor], atol: float = 1e-5) -> list[int]:
    """Call ``cached`` over ``timesteps``, check each output against a hand-written
    reference, and return how many attention kernels ran at each step."""
    counts = []
    new_request(cached)
    with torch.no_grad():
        for step, t in enumerate(timesteps):
            with CountAttention() as counter:
                out = cached(**inputs(t))
            counts.append(counter.count)
            assert torch.allclose(out, expected[step], atol=atol, rtol=0), f"step {step}"
    return counts
