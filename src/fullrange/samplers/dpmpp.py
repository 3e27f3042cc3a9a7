"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) in data-prediction form, VP coordinates.

With ``h = λ' - λ`` (``λ = log(alpha/sigma)``) the first-order update is
``x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) x0``: at SNR = 0 (λ = -inf, h = inf) it is DDIM's
``x' = sigma' x + alpha' x0`` and the history term vanishes (r = inf), so no clamp is needed.
"""

from __future__ import annotations

import math

import torch

from ..denoiser import Denoiser
from ..schedules import Schedule
from ._common import Callback, Ladder, prepare, randn_like, report


def dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    steps: torch.Tensor,
    *,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), Alg. 2: ``D = (1 + 1/2r) x0 - (1/2r) x0_prev``, ``r = h_prev / h``; the SDE at η = 0."""
    return dpmpp_2m_sde(denoiser, x, schedule, steps, cond=cond, generator=generator, callback=callback, eta=0.0)


def dpmpp_2m_sde(
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
    """SDE-DPM-Solver++(2M), midpoint form (k-diffusion's ``sample_dpmpp_2m_sde``); η = 0 is the ODE.

    ``x' = (sigma'/sigma) e^{-ηh} x + alpha' (1 - e^{-(1+η)h}) D + sigma' sqrt(1 - e^{-2ηh}) z``, with D
    the 2nd-order data term of :func:`dpmpp_2m`.
    """
    lad = prepare(schedule, steps)
    cond = cond or {}
    x0_prev = None
    for i in range(lad.num_steps):
        x0 = denoiser(x, lad.t[i], lad.alphas_cumprod[i], **cond)
        report(callback, lad, i, x, x0)
        if i == lad.num_steps - 1:
            return x0
        x = dpmpp_step(lad, i, x, x0, x0_prev, eta, generator)
        x0_prev = x0
    raise AssertionError("unreachable")


def dpmpp_step(
    lad: Ladder,
    i: int,
    x: torch.Tensor,
    x0: torch.Tensor,
    x0_prev: torch.Tensor | None,
    eta: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One (SDE-)DPM-Solver++(2M) step from point i to i+1, given the model's x0 here and at point i-1."""
    h = lad.lam[i + 1] - lad.lam[i]
    eta_h = eta * h if eta > 0 else 0.0
    ratio = lad.sigma[i + 1] / lad.sigma[i]
    data = x0
    h_prev = lad.lam[i] - lad.lam[i - 1] if i > 0 else math.inf
    if x0_prev is not None and math.isfinite(h_prev):
        r = h_prev / h
        data = x0 + (x0 - x0_prev) / (2 * r)
    x = ratio * math.exp(-eta_h) * x + lad.alpha[i + 1] * (-math.expm1(-h - eta_h)) * data
    if eta > 0:
        x = x + lad.sigma[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * randn_like(x, generator)
    return x
