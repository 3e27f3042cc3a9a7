import math

import pytest
import torch

from fullrange import metrics, toy


def _tweedie(log_density, x, ac):
    """E[x0 | x_t] = (x_t + (1 - ᾱ) ∇ log p(x_t)) / sqrt(ᾱ) (Tweedie / Robbins)."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_density(x).sum(), x)
    return (x + (1 - ac) * grad) / math.sqrt(ac)


@pytest.mark.parametrize("ac", [0.9, 0.2, 0.01])
def test_mixture_denoiser_is_the_posterior_mean(ac, gen):
    data = toy.MixtureToy(levels=(-0.7, 0.1, 0.8), weights=(1.0, 2.0, 1.0), pixel_std=0.3)
    x = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64) * 0.5
    a, s = math.sqrt(ac), math.sqrt(1 - ac)
    var = a**2 * 0.09 + s**2
    mu = torch.tensor([-0.7, 0.1, 0.8], dtype=torch.float64)
    logw = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64).log()

    def log_density(x_t):
        sq = ((x_t.flatten(1)[:, None, :] - a * mu[None, :, None]) ** 2).sum(-1)
        return torch.logsumexp(logw - sq / (2 * var), dim=1)

    torch.testing.assert_close(data.denoise(x, 0, ac), _tweedie(log_density, x, ac))


@pytest.mark.parametrize("ac", [0.9, 0.2, 0.01, 0.0])
def test_image_mixture_denoiser_is_the_posterior_mean(ac, gen):
    means = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    data = toy.ImageMixtureToy(means, pixel_std=0.3)
    x = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    if ac == 0:  # SNR = 0: the data mean, whatever x_t is
        torch.testing.assert_close(data.denoise(x, 0, ac), means.mean(0).expand_as(x))
        return
    a, s = math.sqrt(ac), math.sqrt(1 - ac)
    var = a**2 * 0.09 + s**2

    def log_density(x_t):
        sq = ((x_t.flatten(1)[:, None, :] - a * means.flatten(1)[None]) ** 2).sum(-1)
        return torch.logsumexp(-sq / (2 * var), dim=1)

    torch.testing.assert_close(data.denoise(x, 0, ac), _tweedie(log_density, x, ac))
    # Flat components are MixtureToy.
    flat = toy.MixtureToy(levels=(-0.5, 0.2, 0.7), pixel_std=0.3)
    levels = torch.tensor(flat.levels, dtype=torch.float64).reshape(3, 1, 1, 1)
    images = toy.ImageMixtureToy(levels.expand(3, 2, 3, 3), pixel_std=0.3)
    torch.testing.assert_close(images.denoise(x, 0, ac), flat.denoise(x, 0, ac))


def test_gaussian_denoiser_and_flow(gen):
    data = toy.GaussianToy(mean=0.3, std=0.5)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    ac = 0.4
    var = ac * 0.25 + (1 - ac)
    log_density = lambda x_t: (-((x_t - math.sqrt(ac) * 0.3) ** 2) / (2 * var)).sum(-1)  # noqa: E731
    torch.testing.assert_close(data.denoise(x, 0, ac), _tweedie(log_density, x, ac))
    # The flow composes and maps the marginal at ᾱ onto the data distribution.
    torch.testing.assert_close(data.flow(data.flow(x, 0.01, 0.3), 0.3, 0.9), data.flow(x, 0.01, 0.9))
    marginal = math.sqrt(0.01) * 0.3 + math.sqrt(0.01 * 0.25 + 0.99) * torch.randn(
        200_000, generator=gen, dtype=torch.float64
    )
    mapped = data.flow(marginal, 0.01, 1.0)
    assert mapped.mean().item() == pytest.approx(0.3, abs=0.005)
    assert mapped.std().item() == pytest.approx(0.5, abs=0.005)


def test_mixture_at_zero_snr_returns_the_data_mean(gen):
    data = toy.MixtureToy(levels=(-0.5, 0.9), weights=(3.0, 1.0))
    out = data.denoise(torch.randn(4, 3, 8, 8, generator=gen), 999, 0.0)
    torch.testing.assert_close(out, torch.full_like(out, 0.75 * -0.5 + 0.25 * 0.9))


def test_mixture_samples_have_the_stated_brightness(gen):
    data = toy.MixtureToy()
    x = data.sample((4000, 3, 8, 8), gen)
    levels = torch.tensor(data.levels, dtype=torch.float64)
    b = metrics.brightness(x)
    assert b.std().item() == pytest.approx(levels.std(unbiased=False).item() / 2, rel=0.05)
    assert b.min().item() == pytest.approx((min(data.levels) + 1) / 2, abs=0.03)
