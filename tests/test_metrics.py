"""Brightness statistics (fullrange.metrics), checked against their formulas."""

import math

import pytest
import torch

from fullrange import metrics


def test_colour_cast_of_grey_and_primaries():
    grey = torch.zeros(4, 3, 8, 8)
    assert metrics.colour_cast(grey) == {"chroma": 0.0, "leans": {}}
    red = torch.stack([torch.ones(8, 8), -torch.ones(8, 8), -torch.ones(8, 8)])[None]
    magenta = torch.stack([torch.ones(8, 8), -torch.ones(8, 8), torch.ones(8, 8)])[None]
    cast = metrics.colour_cast(torch.cat([red, red, magenta]))
    # red (1, 0, 0): d = (2/3, -1/3, -1/3), |d| = sqrt(6)/3; magenta (1, 0, 1): d = (1/3, -2/3, 1/3), the same norm
    assert cast["chroma"] == pytest.approx(6**0.5 / 3)
    assert cast["leans"] == {"red": 2, "magenta": 1}


def test_brightness_spread_and_saturation():
    x = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 0.0, 1.0)])
    assert metrics.brightness(x).tolist() == [0.0, 0.5, 1.0]
    data = torch.stack([torch.full((3, 4, 4), v) for v in (-0.5, 0.5)])
    # per-image means 0, 0.5, 1 (std 0.5) against 0.25, 0.75 (std 0.3536)
    assert metrics.spread_ratio(x, data) == pytest.approx(0.5 / (0.5 / math.sqrt(2)))
    assert metrics.saturation(x) == pytest.approx(2 / 3)
    assert metrics.saturation(torch.tensor([[0.97, -0.99, 0.5]]), threshold=0.98) == pytest.approx(1 / 3)


def test_mean_leak_is_the_signal_mean_in_noise_mean_stds():
    """REFERENCE: at SD's t = T-1 (SNR 0.0046819) a 4×64×64 latent's unit mean shift is 8.76 std of the noise's mean;
    measured here as that shift against the empirical std of the mean of N noise values."""
    snr, n = 0.0046819, 4 * 64 * 64
    assert float(metrics.mean_leak(snr, n)) == pytest.approx(math.sqrt(snr * n))
    a, s = math.sqrt(snr / (1 + snr)), math.sqrt(1 / (1 + snr))
    noise_means = (s * torch.randn(2000, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).mean(1)
    assert a / noise_means.std().item() == pytest.approx(float(metrics.mean_leak(snr, n)), rel=0.05)
    assert float(metrics.mean_leak(0.0, n)) == 0.0


def test_wasserstein_of_shifted_samples_is_the_shift():
    a = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert metrics.wasserstein_1d(a, a) == 0.0
    assert metrics.wasserstein_1d(a, a + 0.2) == pytest.approx(0.2)
