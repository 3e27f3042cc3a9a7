"""DDIM (Song et al. 2021, eq. 12) in x0 form; DDPM is its η = 1 case (Song et al. §4.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..prediction import to_eps
from ._common import Stepper, randn_like


@dataclass(eq=False)
class DDIM(Stepper):
    """DDIM: ``x' = a' x0 + sqrt(s'² - std²) eps + std z`` with ``std = η (s'/s) sqrt(1 - a²/a'²)``.

    eps is recomputed from x0 (``(x - a x0) / s``), so the step at SNR = 0 (a = 0) is exact. η = 0 is the
    deterministic sampler, η = 1 the DDPM posterior (Ho et al. 2020, eq. 6-7).
    """

    eta: float = 0.0

    def step(self, x: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        lad, i = self.ladder, self.i
        self.i += 1
        eps = to_eps(x0, x, lad.alphas_cumprod[i])
        a, s, a_next, s_next = lad.a[i], lad.s[i], lad.a[i + 1], lad.s[i + 1]
        # Song et al.'s σ_t(η): the std of the fresh noise, η times the DDPM posterior's.
        std = self.eta * (s_next / s) * math.sqrt(1 - (a / a_next) ** 2)
        x = a_next * x0 + math.sqrt(max(s_next**2 - std**2, 0.0)) * eps
        return x + std * randn_like(x, generator) if std > 0 else x
