"""Exact (closed-form) denoisers ``E[x0 | x_t]`` for toy data, standing in for a trained network.

With ``a = sqrt(ᾱ)``, ``s = sqrt(1 - ᾱ)`` and ``x_t = a x0 + s eps``:
- Gaussian data ``x0 ~ N(mu, c² I)``: ``E[x0 | x_t] = mu + a c² / (a² c² + s²) · (x_t - a mu)``.
- A mixture of flat images ``x0 = mu_k 1 + c z`` (weight w_k): each component is Gaussian as above, with
  responsibility ``∝ w_k exp((a mu_k Σx_t - a² mu_k² N / 2) / (a² c² + s²))`` over N values.
- A mixture of arbitrary images ``x0 = m_k + c z``: the same with ``a <m_k, x_t> - a² |m_k|² / 2`` in the exponent.
They let anyone see the brightness effect of the article and the paper without training: the only way these
denoisers learn a sample's brightness is through the image mean that ``a`` leaks into ``x_t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _coefficients(alpha_cumprod: float) -> tuple[float, float]:
    return math.sqrt(alpha_cumprod), math.sqrt(1 - alpha_cumprod)


@dataclass(frozen=True)
class GaussianToy:
    """Data ``N(mean, std² I)``; exact denoiser and exact probability-flow map."""

    mean: float = 0.3
    std: float = 0.5

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None, dtype=torch.float64):
        return self.mean + self.std * torch.randn(shape, generator=generator, dtype=dtype)

    def denoise(self, x: torch.Tensor, t: float, alpha_cumprod: float, **cond) -> torch.Tensor:
        a, s = _coefficients(alpha_cumprod)
        gain = a * self.std**2 / (a**2 * self.std**2 + s**2)
        return self.mean + gain * (x - a * self.mean)

    def flow(self, x: torch.Tensor, alpha_cumprod_from: float, alpha_cumprod_to: float) -> torch.Tensor:
        """The exact ODE solution: ``(x - a mu) / sqrt(a² c² + s²)`` is constant along the flow."""
        a, s = _coefficients(alpha_cumprod_from)
        a2, s2 = _coefficients(alpha_cumprod_to)
        z = (x - a * self.mean) / math.sqrt(a**2 * self.std**2 + s**2)
        return a2 * self.mean + math.sqrt(a2**2 * self.std**2 + s2**2) * z


@dataclass(frozen=True)
class MixtureToy:
    """Flat images at brightness ``levels`` (data units, [-1, 1]) with weights, plus pixel noise ``pixel_std``."""

    levels: tuple[float, ...] = (-0.9, -0.6, -0.3, 0.0, 0.3, 0.6, 0.9)
    weights: tuple[float, ...] | None = None
    pixel_std: float = 0.2

    def _log_weights(self, device, dtype) -> torch.Tensor:
        w = torch.tensor(self.weights or [1.0] * len(self.levels), device=device, dtype=dtype)
        return (w / w.sum()).log()

    def sample(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, dtype=torch.float64
    ) -> torch.Tensor:
        """``shape = (B, C, H, W)``: one component per image, then pixel noise."""
        k = torch.multinomial(self._log_weights("cpu", torch.float64).exp(), shape[0], True, generator=generator)
        levels = torch.tensor(self.levels, dtype=dtype)[k].reshape(-1, *(1,) * (len(shape) - 1))
        return levels + self.pixel_std * torch.randn(shape, generator=generator, dtype=dtype)

    def denoise(self, x: torch.Tensor, t: float, alpha_cumprod: float, **cond) -> torch.Tensor:
        a, s = _coefficients(alpha_cumprod)
        var = a**2 * self.pixel_std**2 + s**2
        flat = x.flatten(1).to(torch.float64)
        n = flat.shape[1]
        mu = torch.tensor(self.levels, dtype=torch.float64, device=x.device)
        logits = (
            self._log_weights(x.device, torch.float64)
            + (a * mu * flat.sum(1, keepdim=True) - a**2 * mu**2 * n / 2) / var
        )
        mean = (logits.softmax(dim=1) * mu).sum(1).reshape(-1, *(1,) * (x.ndim - 1)).to(x.dtype)
        return mean + (a * self.pixel_std**2 / var) * (x - a * mean)


@dataclass(frozen=True, eq=False)
class ImageMixtureToy:
    """Equally likely component images ``means`` (K, C, H, W) plus pixel noise ``pixel_std``: structure at every
    scale, unlike :class:`MixtureToy`'s flat components."""

    means: torch.Tensor
    pixel_std: float = 0.2

    def sample(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, dtype=torch.float64
    ) -> torch.Tensor:
        """``shape = (B, C, H, W)`` with ``(C, H, W)`` the components' shape."""
        if tuple(shape[1:]) != tuple(self.means.shape[1:]):
            raise ValueError(f"shape {tuple(shape)} does not match the components' {tuple(self.means.shape[1:])}")
        k = torch.randint(len(self.means), (shape[0],), generator=generator)
        return self.means[k].to(dtype) + self.pixel_std * torch.randn(shape, generator=generator, dtype=dtype)

    def denoise(self, x: torch.Tensor, t: float, alpha_cumprod: float, **cond) -> torch.Tensor:
        a, s = _coefficients(alpha_cumprod)
        var = a**2 * self.pixel_std**2 + s**2
        means = self.means.flatten(1).to(device=x.device, dtype=torch.float64)
        flat = x.flatten(1).to(torch.float64)
        logits = (a * flat @ means.T - a**2 * means.pow(2).sum(1) / 2) / var
        mean = (logits.softmax(dim=1) @ means).reshape(x.shape).to(x.dtype)
        return mean + (a * self.pixel_std**2 / var) * (x - a * mean)


LABELS = ("solid black", "solid white", "dark scene", "bright scene", "any")
"""Labels of the built-in data set, standing in for prompts: four pin the brightness, "any" leaves it free."""
LABEL_WEIGHTS = (0.1, 0.1, 0.2, 0.2, 0.4)
BRIGHTNESS_RANGE = {"dark scene": (0.05, 0.3), "bright scene": (0.7, 0.95), "any": (0.05, 0.95)}


def synthetic_images(
    num_images: int, size: int = 16, channels: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in data set: ``(images in [-1, 1] of shape (n, channels, size, size), labels (n,))``.

    Image ``i`` depends only on ``(seed, i)``. "solid black" / "solid white" are constant -1 / +1;
    the scenes have a target brightness drawn from :data:`BRIGHTNESS_RANGE`, a background gradient,
    one to three shapes, stripes, pixel texture and a per-channel tint, shifted to that brightness and
    clipped to [0, 1].
    """
    if num_images <= 0 or size < 4 or channels <= 0:
        raise ValueError(f"need num_images > 0, size >= 4, channels > 0; got {num_images}, {size}, {channels}")
    images = torch.empty(num_images, channels, size, size)
    labels = torch.empty(num_images, dtype=torch.long)
    weights = torch.tensor(LABEL_WEIGHTS)
    coords = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    for i in range(num_images):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        label = int(torch.multinomial(weights, 1, generator=g))
        labels[i] = label
        name = LABELS[label]
        if name in ("solid black", "solid white"):
            images[i] = -1.0 if name == "solid black" else 1.0
            continue

        def u(lo: float, hi: float, g: torch.Generator = g) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=g))

        low, high = BRIGHTNESS_RANGE[name]
        target = u(low, high)
        angle = u(0, 2 * math.pi)
        img = u(-0.2, 0.2) * ((xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle))
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            cx, cy, r = u(0.1, 0.9), u(0.1, 0.9), u(0.1, 0.35)
            if float(torch.rand((), generator=g)) < 0.5:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
            else:
                mask = ((xx - cx).abs() < r) & ((yy - cy).abs() < r * u(0.4, 1.0))
            img = torch.where(mask, img + u(-0.3, 0.3), img)
        img = img + u(0, 0.08) * torch.sin(2 * math.pi * u(2, 6) * (xx * math.cos(angle) - yy * math.sin(angle)))
        img = img + 0.03 * torch.randn((size, size), generator=g)
        tint = 1 + 0.3 * (torch.rand(channels, 1, 1, generator=g) - 0.5)
        img = img.unsqueeze(0) * tint
        img = (img - img.mean() + target).clamp(0, 1)
        images[i] = img * 2 - 1
    return images, labels
