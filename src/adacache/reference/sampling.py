"""Deterministic DDIM sampling with classifier-free guidance for the reference DiT.

The denoiser is only ever called as ``model(hidden_states=..., timestep=..., class_labels=...)`` and
only ``.sample`` of the result is used, so any wrapper or compiled module with that call signature
(e.g. an adacache-cached model) can be passed instead of the diffusers model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .model import NULL_CLASS, build_scheduler

__all__ = ["sample", "initial_noise"]


def initial_noise(
    seeds: Sequence[int],
    shape: tuple[int, int, int] = (1, 16, 16),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard-normal starting noise, one CPU generator per sample.

    Drawing each sample from its own seed makes a sample independent of the batch it is in.

    Args:
        seeds: one integer seed per sample.
        shape: ``(C, H, W)`` of a sample.
        dtype: dtype of the result.

    Returns:
        Tensor ``(len(seeds), C, H, W)`` on CPU.
    """
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(dtype)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    try:
        p = next(model.parameters())
        return p.device, p.dtype
    except (StopIteration, AttributeError):
        return torch.device("cpu"), torch.float32


def _model_shape(model: nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "config", None)
    in_ch = int(getattr(cfg, "in_channels", 1)) if cfg is not None else 1
    size = int(getattr(cfg, "sample_size", 16)) if cfg is not None else 16
    return in_ch, size


def _owns_trajectory(model: nn.Module) -> bool:
    """Whether ``model`` is compiled with a policy that needs the runtime to own the loop."""
    from adacache.runtime.module import CachedModule

    return isinstance(model, CachedModule) and model.adacache.policy.owns_trajectory


@torch.no_grad()
def sample(
    model: nn.Module,
    class_labels: Sequence[int] | torch.Tensor,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    num_steps: int = 50,
    guidance_scale: float = 4.0,
    scheduler: Any | None = None,
    *,
    null_class: int = NULL_CLASS,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate images for ``class_labels`` with DDIM (eta = 0) and classifier-free guidance.

    Each denoiser call evaluates one batch of ``2B``: the conditional half first, then the
    null-class half (``[cond; uncond]``), and combines
    ``eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)``.  With ``guidance_scale == 1``
    the unconditional half is skipped and the batch is ``B``.

    Args:
        model: denoiser with the ``DiTTransformer2DModel`` call signature.
        class_labels: ``B`` class indices in ``[0, 9]``.
        seeds: one seed per sample for the initial noise (default ``0..B-1``); ignored when
            ``generator`` is given.
        generator: alternatively, a CPU generator from which all the initial noise is drawn at once
            (then results do depend on batch composition).
        num_steps: number of DDIM steps.
        guidance_scale: CFG scale.
        scheduler: a diffusers scheduler to take the noise schedule from (a fresh instance of its class
            is built from its config, so the caller's object is not mutated); default: the reference
            DDIM scheduler.
        null_class: label of the unconditional embedding.
        device: device to run on (default: the model's parameters' device, else CPU).
        dtype: dtype of the latents fed to the model (default: the model's parameter dtype).
        progress: show a tqdm bar.

    Returns:
        float32 CPU tensor ``(B, C, H, W)`` clamped to ``[-1, 1]``.
    """
    labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
    b = labels.numel()
    m_dev, m_dtype = _model_device_dtype(model)
    dev = torch.device(device) if device is not None else m_dev
    dt = dtype if dtype is not None else m_dtype
    in_ch, size = _model_shape(model)

    if generator is not None:
        x = torch.randn((b, in_ch, size, size), generator=generator)
    else:
        x = initial_noise(list(range(b)) if seeds is None else list(seeds), (in_ch, size, size))
        if x.shape[0] != b:
            raise ValueError(f"got {x.shape[0]} seeds for {b} labels")
    x = x.to(dev, torch.float32)

    sched = build_scheduler("ddim") if scheduler is None else type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(num_steps)
    x = x * sched.init_noise_sigma

    use_cfg = guidance_scale != 1.0
    labels = labels.to(dev)
    if use_cfg:
        model_labels = torch.cat([labels, torch.full_like(labels, null_class)])
    else:
        model_labels = labels

    def denoise(m: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x, x]) if use_cfg else x
        x_in = sched.scale_model_input(x_in, t)
        t_batch = torch.full((x_in.shape[0],), int(t), dtype=torch.long, device=dev)
        out = m(hidden_states=x_in.to(dt), timestep=t_batch, class_labels=model_labels).sample
        out = out.float()
        # Models with learned variance predict [eps, variance]; DDIM only needs eps.
        if out.shape[1] == 2 * in_ch:
            out = out[:, :in_ch]
        if use_cfg:
            eps_c, eps_u = out.chunk(2)
            return eps_u + guidance_scale * (eps_c - eps_u)
        return out

    from adacache.runtime.module import CachedModule

    if _owns_trajectory(model):
        # Z-Cache rewrites the trajectory: the runtime's loop runs the same steps.
        from adacache.runtime.sampling import sample as runtime_sample

        x = runtime_sample(model, sched, x, denoise, progress=progress)
    else:
        if isinstance(model, CachedModule):
            # One call of this function is one request: say so, rather than let the runtime infer it.
            model.adacache.new_request(total_steps=len(sched.timesteps))
        steps = sched.timesteps
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="sampling")
        for t in steps:
            x = sched.step(denoise(model, x, t), t, x).prev_sample
    return x.clamp(-1.0, 1.0).cpu()
