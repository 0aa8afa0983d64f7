"""Reference model and assets: a tiny class-conditional DiT for 16x16 digits and a digit classifier.

Shipped assets (``assets/``):

* ``dit/``: ``DiTTransformer2DModel`` weights + config (``from_pretrained``-loadable) and a
  ``DDIMScheduler`` ``scheduler_config.json``.
* ``classifier/``: ``classifier.safetensors`` for :class:`~adacache.reference.classifier.DigitClassifier`.

Heavy imports (diffusers) happen inside the functions so importing this package stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .classifier import features, load_classifier, predict
from .model import NULL_CLASS, NUM_CLASSES
from .sampling import initial_noise, sample

__all__ = [
    "ASSETS_DIR",
    "DIT_DIR",
    "NULL_CLASS",
    "NUM_CLASSES",
    "features",
    "initial_noise",
    "load_classifier",
    "load_reference_model",
    "load_reference_scheduler",
    "predict",
    "sample",
]

ASSETS_DIR = Path(__file__).parent / "assets"
DIT_DIR = ASSETS_DIR / "dit"


def load_reference_model(
    path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Load the shipped reference DiT (``DiTTransformer2DModel``) in eval mode.

    Args:
        path: a diffusers model directory; defaults to the shipped ``assets/dit``.
        device: target device.
        dtype: target dtype.
    """
    from diffusers import DiTTransformer2DModel

    # torch_dtype at load time (instead of .to(dtype)) is what diffusers recommends for casting.
    model = DiTTransformer2DModel.from_pretrained(
        str(path or DIT_DIR), torch_dtype=dtype, low_cpu_mem_usage=False  # accelerate is optional
    )
    return model.to(device=device).eval()


def load_reference_scheduler(path: str | Path | None = None) -> Any:
    """Load the shipped ``DDIMScheduler`` (linear betas, 1000 train steps, epsilon prediction)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(str(path or DIT_DIR))
