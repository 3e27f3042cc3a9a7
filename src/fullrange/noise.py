"""Training noise. Every draw takes a ``torch.Generator``; nothing touches the global RNG.

Shapes are ``(B, C, H, W)`` (any trailing spatial dims for gaussian and offset).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NOISES = ("gaussian", "offset", "pyramid")


def gaussian(
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """iid ``N(0, I)``."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def offset(
    shape: tuple[int, ...],
    strength: float = 0.1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Offset noise (Guttenberg 2023): ``randn(shape) + strength · randn(B, C, 1, 1)``; variance ``1 + strength²``."""
    eps = gaussian(shape, generator, device, dtype)
    # One draw per sample and channel: a shift of the channel's mean, which iid noise of N values only makes at
    # std 1/sqrt(N), so the model learns to move the mean where it would otherwise read it from the noise.
    per_channel = gaussian((*shape[:2], *(1,) * (len(shape) - 2)), generator, device, dtype)
    return eps + strength * per_channel


def pyramid(
    shape: tuple[int, int, int, int],
    discount: float = 0.8,
    levels: int = 10,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pyramid (multi-resolution) noise (Whitaker 2023), renormalised to unit std per sample.

    Level ``i`` draws noise at ``size / r**i`` with ``r ~ U[2, 4)``, upsamples it bilinearly and adds it
    with weight ``discount**i``; it stops when a side reaches 1 pixel.
    """
    if len(shape) != 4:
        raise ValueError(f"pyramid noise needs a (B, C, H, W) shape, got {tuple(shape)}")
    b, c, h, w = shape
    noise = gaussian(shape, generator, device, torch.float32)
    for i in range(1, levels):
        r = 2 + 2 * torch.rand((), generator=generator, device=device).item()
        hi, wi = max(1, int(h / r**i)), max(1, int(w / r**i))
        low = gaussian((b, c, hi, wi), generator, device, torch.float32)
        noise = noise + discount**i * F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        if hi == 1 or wi == 1:
            break
    return (noise / noise.std(dim=(1, 2, 3), keepdim=True)).to(dtype)


def perturb(eps: torch.Tensor, gamma: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023): the noise fed to ``x_t`` is ``eps + γ ξ``; the target stays eps."""
    xi = torch.randn(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
    return eps + gamma * xi
