"""The leak-aware start (Everaert et al. 2024): the equation, checked on the closed-form toys, and its DCT pieces."""

import itertools
import math
import warnings

import pytest
import torch

import fullrange
from fullrange import leak, toy
from fullrange.sampling import STABLE_DIFFUSION, ZERO_TERMINAL_SNR, SamplingSpec


def x0_network(data, schedule):
    """A toy's exact denoiser as an x0-predicting network ``model(x_t, t)``."""

    def model(x, t):
        return data.denoise(x, float(t[0]), float(schedule.alphas_cumprod_at(float(t[0]))))

    return model


def test_dct_is_orthonormal_and_low_frequencies_are_size_independent(gen):
    m = leak.dct_matrix(7)
    torch.testing.assert_close(m @ m.T, torch.eye(7, dtype=torch.float64))
    # A constant image's only coefficient is its value; a cosine's is the same at every size.
    constant = leak.low_frequencies(torch.full((1, 5, 6), 0.3, dtype=torch.float64), 2)[0]
    torch.testing.assert_close(constant, torch.tensor([[0.3, 0.0], [0.0, 0.0]], dtype=torch.float64))
    coefficients = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    small, large = leak.from_low_frequencies(coefficients, (8, 8)), leak.from_low_frequencies(coefficients, (32, 24))
    torch.testing.assert_close(leak.low_frequencies(small, 3), coefficients)
    torch.testing.assert_close(leak.low_frequencies(large, 3), coefficients)
    torch.testing.assert_close(small.mean((-2, -1)), coefficients[..., 0, 0])
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        leak.low_frequencies(torch.zeros(1, 4, 4), 5)


def test_start_is_the_forward_process_with_the_leak_as_x0(gen):
    noise = torch.randn(2, 3, 4, 4, generator=gen)
    means = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    x = leak.start(noise, means, 0.25)
    torch.testing.assert_close(x, 0.5 * means + math.sqrt(0.75) * noise)
    with pytest.raises(ValueError, match=r"leak of shape \(2,\) does not broadcast"):
        leak.start(noise, torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        leak.start(noise, torch.full((1, 3, 1, 1), math.nan), 0.5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "karras"])
def test_sampling_with_a_leak_follows_the_exact_flow_of_the_gaussian_toy(spacing, gen):
    """For Gaussian data the probability-flow ODE is linear: from x_T = a L + s ε it ends at
    ``mu + c (x_T - a mu) / sqrt(a² c² + s²)``, so the mean of the samples given L is
    ``mu + c a (L - mu) / sqrt(a² c² + s²)``, with a = sqrt(ᾱ) at the sampler's actual first step. (A sampler
    returns the denoiser's x0 at its last step: the flow to that step, then the exact denoiser.)"""
    data = toy.GaussianToy(mean=0.1, std=0.5)
    spec = STABLE_DIFFUSION
    schedule = spec.schedule
    model = x0_network(data, schedule)
    noise = torch.randn(4000, 1, 2, 2, generator=gen, dtype=torch.float64)
    target = torch.tensor(-1.0, dtype=torch.float64)
    steps = spec.plan(120, spacing)
    ac = float(schedule.alphas_cumprod_at(float(steps[0])))
    a, s = math.sqrt(ac), math.sqrt(1 - ac)
    spec_x0 = SamplingSpec(schedule, "sample", spec.spacing, spec.steps_offset)
    out = fullrange.sample(model, noise, spec_x0, sampler="heun", steps=steps, leak=target)
    x_first = a * target + s * noise
    t_last = float(steps[-1])
    ac_last = float(schedule.alphas_cumprod_at(t_last))
    exact = data.denoise(data.flow(x_first, ac, ac_last), t_last, ac_last)
    torch.testing.assert_close(out, exact, atol=1e-3, rtol=0)
    expected_mean = data.mean + data.std * a * (float(target) - data.mean) / math.sqrt(a**2 * data.std**2 + s**2)
    stderr = data.std * s / math.sqrt(a**2 * data.std**2 + s**2) / math.sqrt(noise.numel())
    assert float(out.mean()) == pytest.approx(expected_mean, abs=4 * stderr + 1e-3)
    without = fullrange.sample(model, noise, spec_x0, sampler="heun", steps=steps)
    assert float(out.mean()) < float(without.mean()) - 0.03  # the leak moved the mean


def test_the_leak_starts_at_the_actual_first_step(gen):
    noise = torch.randn(1, 3, 4, 4, generator=gen)
    seen = []
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    L = torch.tensor([0.5, -0.5, 1.0]).view(1, 3, 1, 1)
    options = {"sampler": "ddim", "steps": 10, "spacing": "leading", "leak": L}
    fullrange.sample(model, noise, STABLE_DIFFUSION, **options, callback=lambda info: seen.append(info))
    assert seen[0].t == 901  # leading + 1: SD's first step
    ac = float(STABLE_DIFFUSION.schedule.alphas_cumprod[901])
    assert math.sqrt(ac) == pytest.approx(0.118, abs=5e-4)  # the figure
    torch.testing.assert_close(seen[0].x, math.sqrt(ac) * L + math.sqrt(1 - ac) * noise)


def test_at_zero_snr_the_tone_replaces_the_low_band_of_the_first_prediction(gen, caplog):
    """Zero terminal SNR from t = T-1: nothing leaks, so the tone goes into the model's x0 predictions while σ is
    high (their lowest 3×3 frequencies become L's, the rest stays the model's), and the step from σ = ∞ carries it
    into x; a black tone darkens the samples and a white one brightens them. An INFO line says which mechanism
    acted."""
    import logging

    noise = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    data = toy.MixtureToy()
    model = x0_network(data, ZERO_TERMINAL_SNR.schedule)
    spec = SamplingSpec(ZERO_TERMINAL_SNR.schedule, "sample")
    plain = fullrange.sample(model, noise, spec, sampler="euler", steps=5)
    seen = []
    with caplog.at_level(logging.INFO, logger="fullrange"):
        black = fullrange.sample(
            model, noise, spec, sampler="euler", steps=5, leak=torch.tensor(-1.0), callback=seen.append
        )
    assert "is at zero SNR, where nothing leaks: the tone replaces the lowest frequencies" in caplog.text
    white = fullrange.sample(model, noise, spec, sampler="euler", steps=5, leak=torch.tensor(1.0))
    assert float(black.mean()) < float(plain.mean()) < float(white.mean())
    # The first step's prediction: L's low band, the model's high frequencies.
    first = data.denoise(noise, 999.0, 0.0)
    expected = first - leak.low_band(first) + torch.full_like(first, -1.0)
    torch.testing.assert_close(seen[0].x0, expected)
    torch.testing.assert_close(leak.low_band(leak.low_band(first)), leak.low_band(first))  # a projection
    with warnings.catch_warnings():  # leading steps at zero SNR do not visit t = T-1: there the leak-aware start acts
        warnings.simplefilter("ignore")
        leading = fullrange.sample(
            model, noise, spec, sampler="euler", steps=5, spacing="leading", leak=torch.full_like(noise, -1.0)
        )
    assert float(leading.mean()) < float(plain.mean())


def calibration(size: int, spacing: str, requested: list[float], batch: int = 16, spec=STABLE_DIFFUSION) -> list[float]:
    """Achieved mean brightness (0-1) of the exact mixture denoiser on ``spec``'s schedule (SD's: a leak-aware
    start; zero terminal SNR: the first prediction's band), toned with flat leaks."""
    data = toy.MixtureToy(levels=tuple(torch.linspace(-1, 1, 21).tolist()), pixel_std=0.1)
    spec = SamplingSpec(spec.schedule, "sample", spacing, spec.steps_offset)
    model = x0_network(data, spec.schedule)
    noise = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    achieved = []
    for b in requested:
        out = fullrange.sample(model, noise, spec, sampler="dpmpp_2m", steps=10, leak=torch.tensor(2 * b - 1.0))
        achieved.append(float((out.clamp(-1, 1) + 1).mean() / 2))
    return achieved


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_calibration_is_monotonic_from_black_to_white(spacing, report):
    requested = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    achieved = calibration(16, spacing, requested)
    assert all(lo < hi for lo, hi in itertools.pairwise(achieved)), achieved
    error = sum(abs(a - r) for a, r in zip(achieved, requested, strict=True)) / len(requested)
    report(
        f"leak calibration, exact mixture 3×16×16, SD {spacing}, 10 steps: achieved "
        f"{', '.join(f'{a:.2f}' for a in achieved)} for {requested}; mean error {error:.3f}"
    )
    assert achieved[0] < 0.25 and achieved[-1] > 0.75  # far from the mid-grey of the unleaked start


def test_zero_snr_tone_calibration_is_monotonic_and_close(report):
    """The tone of a model that leaks nothing, on the exact mixture with zero terminal SNR, trailing steps."""
    requested = [0.1, 0.25, 0.5, 0.75, 0.9]
    achieved = calibration(16, "trailing", requested, spec=ZERO_TERMINAL_SNR)
    error = sum(abs(a - r) for a, r in zip(achieved, requested, strict=True)) / len(requested)
    report(
        f"zero-SNR tone calibration, exact mixture 3×16×16, trailing, 10 steps: achieved "
        f"{', '.join(f'{a:.2f}' for a in achieved)} for {requested}; mean error {error:.3f}"
    )
    assert all(lo < hi for lo, hi in itertools.pairwise(achieved)), achieved
    assert error < 0.05


def test_tone_stats_draw_the_fitted_gaussian(gen):
    coefficients = torch.randn(3000, 2, 2, 2, generator=gen, dtype=torch.float64) * 0.3 + 0.5
    coefficients[:, 1] = -coefficients[:, 0]  # perfectly anti-correlated channels
    images = leak.from_low_frequencies(coefficients, (8, 8))
    stats = leak.ToneStats.fit(images, k=2)
    assert stats.mean.tolist() == pytest.approx(coefficients.flatten(1).mean(0).tolist(), abs=1e-9)
    drawn = stats.draw(3000, (16, 16), torch.Generator().manual_seed(1))
    assert drawn.shape == (3000, 2, 16, 16)
    again = leak.low_frequencies(drawn, 2)
    assert again[:, 0].mean().item() == pytest.approx(0.5, abs=0.02)
    torch.testing.assert_close(again[:, 1], -again[:, 0])  # the correlation survives the draw
    assert again[:, 0].std().item() == pytest.approx(0.3, rel=0.05)
    with pytest.raises(ValueError, match="need a mean of \\(8,\\)"):
        leak.ToneStats(torch.zeros(3), torch.zeros(8, 8), 2, 2)
