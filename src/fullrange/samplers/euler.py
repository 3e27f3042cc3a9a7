"""Euler, Euler ancestral and Heun in k-diffusion's σ coordinates (Karras et al. 2022, Alg. 1).

Karras' ODE is ``dx̃/dσ = (x̃ - x0)/σ`` with ``x̃ = x / sqrt(ᾱ)``; its derivative is exactly eps
(``to_eps``), finite at σ = ∞. A step that starts at σ = ∞ is written from x0 (``x̃' = x0 + σ' d``, the
limit of ``x̃ + (σ' - σ) d``) so zero terminal SNR needs no clamp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..prediction import to_eps
from ._common import Ladder, Stepper, randn_like


def euler_step(lad: Ladder, i: int, x: torch.Tensor, x0: torch.Tensor, d: torch.Tensor, sigma_to: float):
    """``x̃' = x̃ + (σ_to - σ_i) d`` from point i, in VP coordinates at point i+1 (σ_to may be below σ_{i+1})."""
    sigma = lad.sigma(i)
    x_ve = x0 + sigma_to * d if math.isinf(sigma) else x / lad.a[i] + (sigma_to - sigma) * d
    return lad.a[i + 1] * x_ve


@dataclass(eq=False)
class Euler(Stepper):
    """Euler's method on the probability-flow ODE in σ (Karras et al. eq. 3); equals DDIM with η = 0."""

    def step(self, x: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        lad, i = self.ladder, self.i
        self.i += 1
        return euler_step(lad, i, x, x0, to_eps(x0, x, lad.alphas_cumprod[i]), lad.sigma(i + 1))


@dataclass(eq=False)
class EulerAncestral(Stepper):
    """Euler to ``σ_down``, then fresh noise of std ``σ_up``: ``σ_up = η σ' sqrt(1 - σ'²/σ²)``,
    ``σ_down = sqrt(σ'² - σ_up²)`` (k-diffusion). With η = 1 this is the DDPM posterior."""

    eta: float = 1.0

    def step(self, x: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        lad, i = self.ladder, self.i
        self.i += 1
        sigma_next = lad.sigma(i + 1)
        ratio = (lad.s[i + 1] * lad.a[i]) / (lad.a[i + 1] * lad.s[i])  # σ'/σ written in VP terms: 0 at σ = ∞
        sigma_up = min(sigma_next, self.eta * sigma_next * math.sqrt(1 - ratio**2))
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = euler_step(lad, i, x, x0, to_eps(x0, x, lad.alphas_cumprod[i]), sigma_down)
        # In VP coordinates the VE noise σ_up z is scaled by a' like the rest of x̃'.
        return x + lad.a[i + 1] * sigma_up * randn_like(x, generator) if sigma_up > 0 else x


@dataclass(eq=False)
class Heun(Stepper):
    """Heun's 2nd-order method (Karras et al. Alg. 1, no churn): an Euler step to the next point, the model evaluated
    there, and the step taken again with the mean of the two slopes; 2 evaluations per step, 2S - 1 in all.

    A step from σ = ∞ stays Euler's: the trapezoid rule over an infinite σ interval is undefined.
    """

    evaluations: ClassVar[int] = 2
    _start: tuple | None = field(default=None, init=False, repr=False)
    """(i, x, x0, slope) at the start of the step being corrected; None at a step's start."""

    @property
    def at_start(self) -> bool:
        return self._start is None

    def step(self, x: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        lad = self.ladder
        if self._start is not None:  # the second evaluation, at the Euler end point: average the slopes
            j, x_j, x0_j, d_j = self._start
            self._start = None
            d = (d_j + to_eps(x0, x, lad.alphas_cumprod[self.i])) / 2
            return euler_step(lad, j, x_j, x0_j, d, lad.sigma(j + 1))
        i = self.i
        self.i += 1
        d = to_eps(x0, x, lad.alphas_cumprod[i])
        if lad.a[i] > 0:
            self._start = (i, x, x0, d)
        return euler_step(lad, i, x, x0, d, lad.sigma(i + 1))
