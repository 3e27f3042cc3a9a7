"""Euler, Euler ancestral and Heun in k-diffusion's σ coordinates (Karras et al. 2022, Alg. 1).

Karras' ODE is ``dx̃/dσ = (x̃ - x0)/σ`` with ``x̃ = x / sqrt(ᾱ)``; its derivative is exactly eps
(``to_eps``), finite at σ = ∞. A step that starts at σ = ∞ is written from x0 (``x̃' = x0 + σ' d``, the
limit of ``x̃ + (σ' - σ) d``) so zero terminal SNR needs no clamp.
"""

from __future__ import annotations

import math

import torch

from ..denoiser import Denoiser
from ..prediction import to_eps
from ..schedules import Schedule
from ._common import Callback, Ladder, prepare, randn_like, report


def euler_step(lad: Ladder, i: int, x: torch.Tensor, x0: torch.Tensor, d: torch.Tensor, sigma_to: float):
    """``x̃' = x̃ + (σ_to - σ_i) d`` in VP coordinates at step i+1 (σ_to may be below σ_{i+1})."""
    sigma = lad.ve_sigma(i)
    x_ve = x0 + sigma_to * d if math.isinf(sigma) else x / lad.alpha[i] + (sigma_to - sigma) * d
    return lad.alpha[i + 1] * x_ve


def euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    steps: torch.Tensor,
    *,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE in σ (Karras et al. eq. 3); equals DDIM with η = 0."""
    lad = prepare(schedule, steps)
    cond = cond or {}
    for i in range(lad.num_steps):
        x0 = denoiser(x, lad.t[i], lad.alphas_cumprod[i], **cond)
        report(callback, lad, i, x, x0)
        if i == lad.num_steps - 1:
            return x0
        d = to_eps(x0, x, lad.alphas_cumprod[i])
        x = euler_step(lad, i, x, x0, d, lad.ve_sigma(i + 1))
    raise AssertionError("unreachable")


def euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    steps: torch.Tensor,
    *,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """Euler to ``σ_down``, then fresh noise of std ``σ_up``: ``σ_up = η σ' sqrt(1 - σ'²/σ²)``,
    ``σ_down = sqrt(σ'² - σ_up²)`` (k-diffusion). With η = 1 this is the DDPM posterior."""
    lad = prepare(schedule, steps)
    cond = cond or {}
    for i in range(lad.num_steps):
        x0 = denoiser(x, lad.t[i], lad.alphas_cumprod[i], **cond)
        report(callback, lad, i, x, x0)
        if i == lad.num_steps - 1:
            return x0
        x = euler_ancestral_step(lad, i, x, x0, eta, generator)
    raise AssertionError("unreachable")


def euler_ancestral_step(
    lad: Ladder, i: int, x: torch.Tensor, x0: torch.Tensor, eta: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One Euler ancestral step from point i to i+1: Euler to ``σ_down``, then noise of std ``σ_up``."""
    sigma_next = lad.ve_sigma(i + 1)
    # σ'/σ in VP terms, 0 at σ = ∞.
    ratio = (lad.sigma[i + 1] * lad.alpha[i]) / (lad.alpha[i + 1] * lad.sigma[i])
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(1 - ratio**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    x = euler_step(lad, i, x, x0, to_eps(x0, x, lad.alphas_cumprod[i]), sigma_down)
    if sigma_up > 0:
        x = x + lad.alpha[i + 1] * sigma_up * randn_like(x, generator)
    return x


def heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    steps: torch.Tensor,
    *,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. Alg. 1, no churn): 2 evaluations per step, 2S - 1 in all.

    A step from σ = ∞ is an Euler step: the trapezoid rule over an infinite σ interval is undefined.
    """
    lad = prepare(schedule, steps)
    cond = cond or {}
    for i in range(lad.num_steps):
        x0 = denoiser(x, lad.t[i], lad.alphas_cumprod[i], **cond)
        report(callback, lad, i, x, x0)
        if i == lad.num_steps - 1:
            return x0
        d = to_eps(x0, x, lad.alphas_cumprod[i])
        sigma, sigma_next = lad.ve_sigma(i), lad.ve_sigma(i + 1)
        x_euler = euler_step(lad, i, x, x0, d, sigma_next)
        if math.isinf(sigma):
            x = x_euler
            continue
        x0_next = denoiser(x_euler, lad.t[i + 1], lad.alphas_cumprod[i + 1], **cond)
        d_next = to_eps(x0_next, x_euler, lad.alphas_cumprod[i + 1])
        x = euler_step(lad, i, x, x0, (d + d_next) / 2, sigma_next)
    raise AssertionError("unreachable")
