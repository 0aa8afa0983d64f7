"""Tests of adacache.eval.metrics against independent references (scikit-image, closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adacache.eval import metrics


def _noisy_pair(seed: int = 0, n: int = 3, size: int = 16, sigma: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    b = (a + sigma * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    return a, b


def test_psnr_identical_is_inf() -> None:
    a, _ = _noisy_pair()
    assert math.isinf(float(metrics.psnr(a, a)))
    assert torch.isinf(metrics.psnr(a, a, reduction="none")).all()
    assert float(metrics.psnr(a, a, max_db=100.0)) == pytest.approx(100.0)


def test_psnr_matches_skimage() -> None:
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _noisy_pair(seed=1)
    ours = metrics.psnr(b, a, reduction="none")
    ref = [peak_signal_noise_ratio(a[i, 0].double().numpy(), b[i, 0].double().numpy(), data_range=2.0) for i in range(3)]
    # torchmetrics accumulates in float32, hence the tolerance.
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6)
    # Closed form for a constant offset: MSE = 0.1^2 -> PSNR = 10 log10(4 / 0.01).
    c = torch.zeros(2, 1, 16, 16)
    assert float(metrics.psnr(c + 0.1, c)) == pytest.approx(10 * math.log10(4.0 / 0.01), rel=1e-6)


def test_ssim_identical_is_one() -> None:
    a, _ = _noisy_pair(seed=2)
    np.testing.assert_allclose(metrics.ssim(a, a, reduction="none").numpy(), 1.0, atol=1e-12)
    assert float(metrics.ssim(a, a, crop_border=True)) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_skimage() -> None:
    from skimage.metrics import structural_similarity

    a, b = _noisy_pair(seed=3)
    kw = dict(data_range=2.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    # crop_border=True must equal scikit-image's standard value exactly.
    ref_std = [structural_similarity(a[i, 0].double().numpy(), b[i, 0].double().numpy(), **kw) for i in range(3)]
    np.testing.assert_allclose(metrics.ssim(b, a, reduction="none", crop_border=True).numpy(), ref_std, rtol=1e-9)
    # Default: mean of scikit-image's full SSIM map.
    ref_full = [
        structural_similarity(a[i, 0].double().numpy(), b[i, 0].double().numpy(), full=True, **kw)[1].mean()
        for i in range(3)
    ]
    np.testing.assert_allclose(metrics.ssim(b, a, reduction="none").numpy(), ref_full, rtol=1e-9)
    assert float(metrics.ssim(b, a)) < 0.95


def test_ssim_decreases_with_noise() -> None:
    a, b_small = _noisy_pair(seed=4, sigma=0.05)
    _, b_big = _noisy_pair(seed=4, sigma=0.5)
    assert float(metrics.ssim(b_small, a)) > float(metrics.ssim(b_big, a))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        metrics.psnr(torch.zeros(2, 1, 16, 16), torch.zeros(3, 1, 16, 16))


def test_frechet_distance_self_is_zero() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 16))
    mu, sig = metrics.feature_statistics(f)
    assert metrics.frechet_distance(mu, sig, mu, sig) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_form() -> None:
    rng = np.random.default_rng(1)
    d = 8
    a = rng.normal(size=(d, d))
    s1 = a @ a.T + 0.1 * np.eye(d)
    shift = rng.normal(size=d)
    # Same covariance, shifted mean: FD = |shift|^2.
    assert metrics.frechet_distance(np.zeros(d), s1, shift, s1) == pytest.approx(float(shift @ shift), rel=1e-8)
    # Isotropic covariances: FD = |dmu|^2 + d (s1 - s2)^2 for sigma = s^2 I.
    fd = metrics.frechet_distance(np.zeros(d), 4.0 * np.eye(d), shift, 9.0 * np.eye(d))
    assert fd == pytest.approx(float(shift @ shift) + d * (2.0 - 3.0) ** 2, rel=1e-8)
    # Generic (non-commuting) case against scipy's sqrtm.
    from scipy.linalg import sqrtm

    b = rng.normal(size=(d, d))
    s2 = b @ b.T + 0.1 * np.eye(d)
    ref = float(shift @ shift + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm(s1 @ s2).real))
    assert metrics.frechet_distance(np.zeros(d), s1, shift, s2) == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_rank_deficient_is_finite() -> None:
    # Fewer samples than dimensions: covariance singular, distance must stay real and finite.
    rng = np.random.default_rng(2)
    mu1, s1 = metrics.feature_statistics(rng.normal(size=(5, 32)))
    mu2, s2 = metrics.feature_statistics(rng.normal(size=(5, 32)) + 1.0)
    fd = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(fd) and fd > 0


def test_fd_digits_real_vs_noise() -> None:
    from adacache.reference.data import load_split

    split = load_split()
    real = split.test_images
    fd_real = metrics.fd_digits(real, reference="train")
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd_noise = metrics.fd_digits(noise, reference="train")
    assert metrics.fd_digits(real, reference=real) == pytest.approx(0.0, abs=1e-6)
    assert fd_real < 0.1 * fd_noise


def test_perceptual_distance_and_accuracy() -> None:
    from adacache.reference.data import load_split

    split = load_split()
    x, y = split.test_images[:50], split.test_labels[:50]
    assert float(metrics.perceptual_distance(x, x)) == pytest.approx(0.0, abs=1e-9)
    assert float(metrics.perceptual_distance(x, x, kind="cosine")) == pytest.approx(0.0, abs=1e-6)
    noisy = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert float(metrics.perceptual_distance(noisy, x)) > 0.0
    d_small = metrics.perceptual_distance((x + 0.05).clamp(-1, 1), x)
    assert float(d_small) < float(metrics.perceptual_distance(noisy, x))
    assert metrics.class_accuracy(x, y) >= 0.9
    assert metrics.class_accuracy(x, (y + 1) % 10) <= 0.1
