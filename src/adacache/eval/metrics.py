"""Image-quality metrics for comparing a cached/compiled model's samples with the reference.

All image arguments are tensors ``(N, C, H, W)`` (or ``(N, H, W)``) with values in ``[-1, 1]``,
so the data range used by PSNR and SSIM is 2.

Perceptual metrics: LPIPS and Inception (FID) weights cannot be downloaded in this environment, so
the penultimate-layer features of the shipped digit classifier
(:func:`adacache.reference.classifier.features`) stand in for them: :func:`perceptual_distance`
replaces LPIPS and :func:`fd_digits` ("FD-digits") replaces FID.  Numbers are only comparable with
other numbers computed with the same classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

__all__ = [
    "DATA_RANGE",
    "psnr",
    "ssim",
    "perceptual_distance",
    "class_accuracy",
    "feature_statistics",
    "frechet_distance",
    "fd_digits",
    "reference_statistics",
]

DATA_RANGE = 2.0  # images live in [-1, 1]

Reduction = Literal["mean", "none"]


def _as_nchw(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) or (N, H, W), got shape {tuple(x.shape)}")
    return x.detach().cpu().to(torch.float64)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_nchw(a), _as_nchw(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def psnr(
    preds: torch.Tensor,
    target: torch.Tensor,
    reduction: Reduction = "mean",
    max_db: float | None = None,
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (torchmetrics), data range 2.

    Identical images have zero error and give ``inf``; the mean over a batch is then ``inf`` too.
    Pass ``max_db`` to cap every per-image value instead (e.g. 100 dB) when a finite average is needed.

    Args:
        preds: images in ``[-1, 1]``.
        target: reference images, same shape.
        reduction: ``"mean"`` (scalar) or ``"none"`` (one value per image).
        max_db: optional cap applied per image before reducing.

    Returns:
        float64 tensor, scalar or ``(N,)``.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _check_pair(preds, target)
    vals = peak_signal_noise_ratio(a, b, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))
    if max_db is not None:
        vals = vals.clamp(max=max_db)
    return vals.mean() if reduction == "mean" else vals


def ssim(
    preds: torch.Tensor,
    target: torch.Tensor,
    reduction: Reduction = "mean",
    crop_border: bool = False,
) -> torch.Tensor:
    """Structural similarity per image (scikit-image, Wang et al. settings), data range 2.

    Uses an 11-tap Gaussian window with sigma 1.5, population covariances, K1=0.01, K2=0.03.
    Channels are averaged.  Identical images give exactly 1.

    By default the SSIM map is averaged over the *whole* image.  scikit-image's own default crops a
    5-pixel border (half the window) before averaging, which on a 16x16 digit would keep only the
    central 6x6 pixels and ignore most strokes; ``crop_border=True`` restores that behaviour.
    (torchmetrics' SSIM was not used because it pads with whole-sample reflection, which differs from
    scikit-image's, so the two libraries disagree noticeably on tiny images.)

    Args:
        preds: images in ``[-1, 1]``.
        target: reference images, same shape.
        reduction: ``"mean"`` (scalar) or ``"none"`` (one value per image).
        crop_border: average only away from the border, like ``skimage.metrics.structural_similarity``.

    Returns:
        float64 tensor, scalar or ``(N,)``.
    """
    from skimage.metrics import structural_similarity

    a, b = _check_pair(preds, target)
    an, bn = a.numpy(), b.numpy()
    pad = 5  # (win_size - 1) // 2 for sigma 1.5, truncate 3.5
    out = np.empty(an.shape[0], dtype=np.float64)
    for i in range(an.shape[0]):
        per_channel = []
        for c in range(an.shape[1]):
            _, smap = structural_similarity(
                an[i, c],
                bn[i, c],
                data_range=DATA_RANGE,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                full=True,
            )
            if crop_border:
                smap = smap[pad:-pad, pad:-pad]
            per_channel.append(float(smap.mean()))
        out[i] = float(np.mean(per_channel))
    vals = torch.from_numpy(out)
    return vals.mean() if reduction == "mean" else vals


def perceptual_distance(
    preds: torch.Tensor,
    target: torch.Tensor,
    kind: Literal["l2", "cosine"] = "l2",
    reduction: Reduction = "mean",
    model: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Distance between classifier features of paired images (LPIPS substitute, see module doc).

    Args:
        preds: images in ``[-1, 1]``.
        target: reference images, same shape.
        kind: ``"l2"`` (Euclidean distance of the 128-d feature vectors) or ``"cosine"`` (1 - cosine similarity).
        reduction: ``"mean"`` or ``"none"``.
        model: classifier to take features from (default: the shipped one).

    Returns:
        float64 tensor, scalar or ``(N,)``; 0 for identical images.
    """
    from adacache.reference.classifier import features

    a, b = _check_pair(preds, target)
    fa = features(a.float(), model).double()
    fb = features(b.float(), model).double()
    if kind == "l2":
        d = (fa - fb).norm(dim=1)
    elif kind == "cosine":
        d = 1.0 - torch.nn.functional.cosine_similarity(fa, fb, dim=1, eps=1e-12)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return d.mean() if reduction == "mean" else d


def class_accuracy(
    images: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    model: torch.nn.Module | None = None,
) -> float:
    """Fraction of ``images`` that the shipped classifier assigns to ``labels`` (their conditioning class)."""
    from adacache.reference.classifier import predict

    x = _as_nchw(images).float()
    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    if y.numel() != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {y.numel()} labels")
    return float((predict(x, model) == y).double().mean())


def feature_statistics(feats: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (N-1 normalised) covariance of feature rows, in float64."""
    f = np.asarray(torch.as_tensor(feats).detach().cpu().double().numpy())
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need a (N>=2, D) feature matrix, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    # Symmetric PSD square root via eigh; tiny negative eigenvalues are round-off, so clip them.
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})``.

    The trace term is computed as ``sum(sqrt(eig(S1^{1/2} S2 S1^{1/2})))``: that matrix is symmetric
    PSD and has the same eigenvalues as ``S1 S2``, so unlike ``scipy.linalg.sqrtm(S1 @ S2)`` this never
    produces complex parts, even for the rank-deficient covariances of small sample sets.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError("inconsistent shapes for means/covariances")
    r1 = _sqrt_psd(s1)
    inner = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    # Clip round-off below zero: the distance of a set to itself should read 0, not -1e-12.
    return max(fd, 0.0)


@lru_cache(maxsize=4)
def _reference_stats_cached(subset: str) -> tuple[np.ndarray, np.ndarray]:
    from adacache.reference.classifier import features
    from adacache.reference.data import load_digits_tensors, load_split

    if subset == "all":
        images, _ = load_digits_tensors()
    elif subset == "train":
        images = load_split().train_images
    elif subset == "test":
        images = load_split().test_images
    else:
        raise ValueError(f"unknown subset {subset!r}")
    return feature_statistics(features(images))


def reference_statistics(subset: Literal["all", "train", "test"] = "all") -> tuple[np.ndarray, np.ndarray]:
    """Classifier-feature mean and covariance of the real digits (cached after the first call)."""
    mu, sigma = _reference_stats_cached(subset)
    return mu.copy(), sigma.copy()


def fd_digits(
    images: torch.Tensor,
    reference: torch.Tensor | Literal["all", "train", "test"] = "all",
    model: torch.nn.Module | None = None,
) -> float:
    """FD-digits: Fréchet distance of classifier features of ``images`` against real digits (FID analogue).

    Like FID it is biased upwards for small sample counts; compare values computed with the same
    number of samples.

    Args:
        images: generated images in ``[-1, 1]`` (at least 2).
        reference: a subset name of the real digits (``"all"`` = 1797 images) or a tensor of reference images.
        model: classifier (default: the shipped one; with a custom model, pass reference images as a tensor).

    Returns:
        The distance (>= 0).
    """
    from adacache.reference.classifier import features

    mu, sigma = feature_statistics(features(_as_nchw(images).float(), model))
    if isinstance(reference, str):
        if model is not None:
            raise ValueError("with a custom model pass the reference images as a tensor")
        mu_r, sigma_r = reference_statistics(reference)  # type: ignore[arg-type]
    else:
        mu_r, sigma_r = feature_statistics(features(_as_nchw(reference).float(), model))
    return frechet_distance(mu, sigma, mu_r, sigma_r)
