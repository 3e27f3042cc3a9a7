"""Classifier-free guidance (Ho & Salimans 2022) and its rescale (Lin et al. 2024, eq. 14-16).

Guidance wraps a denoiser into a denoiser; samplers never see a guidance scale.

In which space the rescale works matters: guidance itself is affine in the model output, so it is the
same in eps, v and x0 space, but the std ratio of eq. 15 is not. The paper rescales the raw v output of
a v-prediction model; diffusers rescales the raw output whatever its type; ComfyUI converts to v first.
fullrange converts to v by default (``v = (sqrt(ᾱ) x_t - x0) / sqrt(1 - ᾱ)``, finite at SNR = 0), so the
same φ means the same thing for eps, v and x0 models, as in the paper.
"""

from __future__ import annotations

import torch

from .denoiser import Denoiser, map_cond
from .prediction import from_v, to_v

RESCALE_SPACES = ("v", "x0")
STD_EPS = 1e-12
"""Floor on std(x_cfg) in eq. 15: a constant (zero-std) guided output is left unscaled, not divided by 0."""


def rescale(guided: torch.Tensor, positive: torch.Tensor, phi: float) -> torch.Tensor:
    """Eq. 15-16: ``phi · guided · std(positive) / std(guided) + (1 - phi) · guided``, std per sample."""
    dims = tuple(range(1, guided.ndim))
    std_pos = positive.std(dim=dims, keepdim=True)
    std_cfg = guided.std(dim=dims, keepdim=True)
    ratio = torch.where(std_cfg > STD_EPS, std_pos / std_cfg.clamp(min=STD_EPS), torch.ones_like(std_cfg))
    return phi * guided * ratio + (1 - phi) * guided


def cfg(
    denoiser: Denoiser,
    scale: float,
    uncond: dict | None = None,
    guidance_rescale: float = 0.0,
    space: str = "v",
) -> Denoiser:
    """``x_neg + w (x_pos - x_neg)`` with optional rescale ``phi`` (eq. 14-16) in ``space`` ("v" or "x0").

    The positive branch gets the caller's ``**cond``, the negative one ``uncond`` (same keys, tensors
    concatenated so both run as one batch; nested dicts alike).
    """
    if space not in RESCALE_SPACES:
        raise ValueError(f"unknown guidance rescale space {space!r}; choose one of {', '.join(RESCALE_SPACES)}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    uncond = uncond or {}

    def guided(x: torch.Tensor, t: float, alpha_cumprod: float, **cond) -> torch.Tensor:
        both = map_cond(lambda negative, positive: torch.cat([negative, positive]), uncond, cond)
        negative, positive = denoiser(torch.cat([x, x]), t, alpha_cumprod, **both).chunk(2)
        if space == "v":
            negative, positive = to_v(negative, x, alpha_cumprod), to_v(positive, x, alpha_cumprod)
        out = negative + scale * (positive - negative)  # affine: the same image in eps, v or x0 space
        if guidance_rescale > 0:  # the std ratio is not affine: it depends on the space (module docstring)
            out = rescale(out, positive, guidance_rescale)
        return from_v(out, x, alpha_cumprod) if space == "v" else out

    return guided
