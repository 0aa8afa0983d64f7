"""Real digits for the reference model: scikit-learn's bundled 8x8 digits, upscaled to 16x16.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships the 1797 images inside the
scikit-learn wheel.  Images are returned as float32 tensors of shape ``(N, 1, 16, 16)`` in
``[-1, 1]`` and integer labels in ``[0, 9]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "DigitsSplit",
    "load_digits_tensors",
    "load_split",
    "random_shift",
]

IMAGE_SIZE = 16
NUM_CLASSES = 10
# sklearn's digits are integer intensities 0..16.
_DIGITS_MAX = 16.0


@lru_cache(maxsize=1)
def _load_cached() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / _DIGITS_MAX
    # align_corners=False keeps the upscaled digit centred like the original grid.
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0) * 2.0 - 1.0
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return images.contiguous(), labels


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Return all 1797 digits as ``(images, labels)``.

    Returns:
        images: float32 ``(1797, 1, 16, 16)`` in ``[-1, 1]`` (background is -1).
        labels: int64 ``(1797,)`` in ``[0, 9]``.
    """
    images, labels = _load_cached()
    # Clone so callers can modify their copy without corrupting the cache.
    return images.clone(), labels.clone()


@dataclass(frozen=True)
class DigitsSplit:
    """A deterministic train / held-out split of the digits."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_split(seed: int = 0, test_fraction: float = 0.2) -> DigitsSplit:
    """Split the digits into train and held-out parts, stratified by class.

    Args:
        seed: seed of the permutation; the same seed always gives the same split.
        test_fraction: fraction of every class that goes to the held-out part.

    Returns:
        A :class:`DigitsSplit`.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    images, labels = load_digits_tensors()
    gen = torch.Generator().manual_seed(seed)
    train_idx: list[torch.Tensor] = []
    test_idx: list[torch.Tensor] = []
    # Stratify so the held-out accuracy is not skewed by a class imbalance of the draw.
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = int(round(idx.numel() * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr = torch.sort(torch.cat(train_idx)).values
    te = torch.sort(torch.cat(test_idx)).values
    return DigitsSplit(images[tr], labels[tr], images[te], labels[te])


def random_shift(images: torch.Tensor, max_shift: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate every image by a random integer offset in ``[-max_shift, max_shift]`` per axis.

    Vacated pixels are filled with the background value -1.  Used as light augmentation.

    Args:
        images: ``(N, C, H, W)`` tensor in ``[-1, 1]``.
        max_shift: largest shift in pixels.
        generator: optional torch generator for reproducibility.

    Returns:
        A new tensor of the same shape.
    """
    if max_shift <= 0:
        return images.clone()
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    out = torch.empty_like(images)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out
