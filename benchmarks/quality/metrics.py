"""PSNR and SSIM of a generated video against a reference video, with scikit-image's implementations.

Videos are `(3, F, H, W)` arrays in [-1, 1] (the model's range), mapped to [0, 1] and clipped, as an image writer
would; `data_range = 1`. Per video: PSNR over all its pixels at once (`10 log10(1 / MSE)`; identical videos give
`inf`), SSIM as the mean over frames of scikit-image's `structural_similarity` (7x7 uniform window, RGB channels
averaged). A method's figure is the mean over videos (`summarise`), with the standard deviation and the minimum.

This module imports only NumPy and scikit-image, so that evaluation can compute metrics in worker processes while the
GPU samples the next run.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["summarise", "to_unit_range", "video_metrics"]


def to_unit_range(video: np.ndarray) -> np.ndarray:
    """`(3, F, H, W)` in [-1, 1] -> `(F, H, W, 3)` float64 in [0, 1] (clipped)."""
    array = np.asarray(video, dtype=np.float64)
    if array.ndim != 4 or array.shape[0] != 3:
        raise ValueError(f"video must have shape (3, frames, height, width), got {array.shape}")
    return np.clip((array.transpose(1, 2, 3, 0) + 1.0) / 2.0, 0.0, 1.0)


def video_metrics(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(PSNR in dB, mean SSIM over frames) of `candidate` against `reference`, both `(3, F, H, W)` in [-1, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref, cand = to_unit_range(reference), to_unit_range(candidate)
    if ref.shape != cand.shape:
        raise ValueError(f"videos differ in shape: {ref.shape} vs {cand.shape}")
    if np.array_equal(ref, cand):
        psnr = math.inf  # scikit-image divides by zero (with a warning) for identical inputs
    else:
        psnr = float(peak_signal_noise_ratio(ref, cand, data_range=1.0))
    ssim = float(np.mean([structural_similarity(r, c, channel_axis=-1, data_range=1.0) for r, c in zip(ref, cand)]))
    return psnr, ssim


def summarise(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation and minimum over videos (`inf` PSNRs: the mean is `inf` only if all are)."""
    if not values:
        return dict(mean=math.nan, std=math.nan, min=math.nan, count=0)
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        mean = math.inf if not finite else float(np.mean(finite))
        return dict(mean=mean, std=math.nan, min=min(values), count=len(values), identical=len(values) - len(finite))
    return dict(mean=float(np.mean(values)), std=float(np.std(values)), min=float(np.min(values)), count=len(values))
