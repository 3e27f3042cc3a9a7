"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) in data-prediction form, VP coordinates.

With ``h = λ' - λ`` (``λ = log(a/s)``) the first-order update is ``x' = (s'/s) x + a' (1 - e^{-h}) x0``: at SNR = 0
(λ = -inf, h = inf) it is DDIM's ``x' = s' x + a' x0`` and the history term vanishes (r = inf), so no clamp is
needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ._common import Stepper, randn_like


@dataclass(eq=False)
class DPMSolverPP(Stepper):
    """SDE-DPM-Solver++(2M), midpoint form (k-diffusion's ``sample_dpmpp_2m_sde``); η = 0 is DPM-Solver++(2M), Alg. 2.

    ``x' = (s'/s) e^{-ηh} x + a' (1 - e^{-(1+η)h}) D + s' sqrt(1 - e^{-2ηh}) z`` with the 2nd-order data term
    ``D = (1 + 1/2r) x0 - (1/2r) x0_prev``, ``r = h_prev / h``.
    """

    eta: float = 1.0
    _x0_prev: torch.Tensor | None = field(default=None, init=False, repr=False)

    def step(self, x: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        lad, i = self.ladder, self.i
        self.i += 1
        h = lad.lam[i + 1] - lad.lam[i]
        eta_h = self.eta * h if self.eta > 0 else 0.0  # not 0 · ∞ (= nan) for the ODE's step from SNR = 0
        data = x0
        h_prev = lad.lam[i] - lad.lam[i - 1] if i > 0 else math.inf
        if self._x0_prev is not None and math.isfinite(h_prev):  # no slope from a point at SNR = 0 (λ = -inf)
            r = h_prev / h
            data = x0 + (x0 - self._x0_prev) / (2 * r)
        self._x0_prev = x0
        x = (lad.s[i + 1] / lad.s[i]) * math.exp(-eta_h) * x + lad.a[i + 1] * (-math.expm1(-h - eta_h)) * data
        if self.eta > 0:
            x = x + lad.s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * randn_like(x, generator)
        return x
