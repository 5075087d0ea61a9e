"""Image metrics: how close a result is to its reference (an inversion's reconstruction to its source)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .checks import check_number


def psnr(image: Any, reference: Any, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB, `10 log10(peak^2 / MSE)`, of two images of one size: PIL images or arrays
    with values in [0, peak] (8-bit images: 255). Identical images give infinity."""
    peak = check_number("peak", peak, above=0)
    a, b = np.asarray(image, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"`image` and `reference` must have one shape, got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
