"""DDIM (Song et al. 2021, eq. 12) in x0 form, and DDPM as its η = 1 case."""

from __future__ import annotations

import math

import torch

from ..denoiser import Denoiser
from ..prediction import to_eps
from ..schedules import Schedule
from ._common import Callback, Ladder, prepare, randn_like, report


def ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    steps: torch.Tensor,
    *,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM: ``x' = a' x0 + sqrt(s'² - σ_η²) eps + σ_η z``, ``σ_η = η (s'/s) sqrt(1 - a²/a'²)``.

    eps is recomputed from x0 (``(x - a x0) / s``), so the step at SNR = 0 (a = 0) is exact.
    η = 0 is the deterministic sampler, η = 1 the DDPM posterior.
    """
    lad = prepare(schedule, steps)
    cond = cond or {}
    for i in range(lad.num_steps):
        x0 = denoiser(x, lad.t[i], lad.alphas_cumprod[i], **cond)
        report(callback, lad, i, x, x0)
        if i == lad.num_steps - 1:
            return x0
        x = ddim_step(lad, i, x, x0, eta, generator)
    raise AssertionError("unreachable")


def ddim_step(
    lad: Ladder, i: int, x: torch.Tensor, x0: torch.Tensor, eta: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One DDIM step from point i to i+1 of ``lad``, given the model's ``x0`` at ``x``."""
    eps = to_eps(x0, x, lad.alphas_cumprod[i])
    a, s, a_next, s_next = lad.alpha[i], lad.sigma[i], lad.alpha[i + 1], lad.sigma[i + 1]
    sigma_eta = eta * (s_next / s) * math.sqrt(1 - (a / a_next) ** 2)
    x = a_next * x0 + math.sqrt(max(s_next**2 - sigma_eta**2, 0.0)) * eps
    if sigma_eta > 0:
        x = x + sigma_eta * randn_like(x, generator)
    return x


def ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    steps: torch.Tensor,
    *,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral DDPM (Ho et al. 2020, eq. 6-7) on any steps: DDIM with η = 1 (Song et al. §4.1)."""
    return ddim(denoiser, x, schedule, steps, cond=cond, generator=generator, callback=callback, eta=1.0)
