import math

import numpy as np
import pytest
from PIL import Image

from guidance.metrics import psnr


def test_psnr_is_ten_log10_of_the_peak_squared_over_the_mean_squared_error():
    reference = np.zeros((4, 4, 3), dtype=np.uint8)
    image = reference.copy()
    image[0, 0, 0] = 48  # MSE = 48^2 / 48 = 48
    assert psnr(image, reference) == pytest.approx(10 * math.log10(255**2 / 48))
    assert psnr(Image.fromarray(image), Image.fromarray(reference)) == psnr(image, reference)  # PIL images alike
    assert psnr(image / 255, reference / 255, peak=1.0) == pytest.approx(psnr(image, reference))
    assert psnr(reference, reference) == math.inf


def test_psnr_checks_its_arguments():
    with pytest.raises(ValueError, match=r"`image` and `reference` must have one shape, got \(2, 2\) and \(2, 3\)"):
        psnr(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="`peak` must be a number > 0, got 0"):
        psnr(np.zeros(2), np.zeros(2), peak=0)
