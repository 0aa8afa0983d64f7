"""Evaluation metrics: PSNR, SSIM, classifier-feature perceptual distance, class accuracy, FD-digits."""

from __future__ import annotations

from .metrics import (
    DATA_RANGE,
    class_accuracy,
    fd_digits,
    feature_statistics,
    frechet_distance,
    perceptual_distance,
    psnr,
    reference_statistics,
    ssim,
)

__all__ = [
    "DATA_RANGE",
    "class_accuracy",
    "fd_digits",
    "feature_statistics",
    "frechet_distance",
    "perceptual_distance",
    "psnr",
    "reference_statistics",
    "ssim",
]
