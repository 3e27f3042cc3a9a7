"""What every sampler shares: per-step coefficients in float64 and the callback record."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..schedules import Schedule


@dataclass(frozen=True)
class StepInfo:
    """Passed to ``callback`` after each model evaluation: step ``i`` of ``num_steps`` at timestep ``t``."""

    i: int
    num_steps: int
    t: float
    x: torch.Tensor
    x0: torch.Tensor


Callback = Callable[[StepInfo], None]


@dataclass(frozen=True)
class Ladder:
    """Coefficients of the visited steps, plain floats computed in float64.

    ``alpha = sqrt(ᾱ)``, ``sigma = sqrt(1 - ᾱ)`` (VP), ``lam = log(alpha / sigma)`` (half log-SNR, -inf at
    SNR = 0). They have ``S + 1`` entries: the last is the clean image (alpha 1, sigma 0, lam +inf).
    ``t`` and ``alphas_cumprod`` have the ``S`` visited entries.
    """

    t: list[float]
    alphas_cumprod: list[float]
    alpha: list[float]
    sigma: list[float]
    lam: list[float]

    @property
    def num_steps(self) -> int:
        return len(self.t)

    def ve_sigma(self, i: int) -> float:
        """k-diffusion ``σ = sigma / alpha`` (inf at SNR = 0, 0 at the clean end)."""
        return math.inf if self.alpha[i] == 0 else self.sigma[i] / self.alpha[i]


def prepare(schedule: Schedule, steps: torch.Tensor) -> Ladder:
    """Check that ``steps`` descend strictly and read their ᾱ from ``schedule``."""
    t = torch.as_tensor(steps).detach().cpu().to(torch.float64).flatten()
    if t.numel() == 0:
        raise ValueError("steps is empty")
    if t.numel() > 1 and not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"steps must be strictly descending, got {t.tolist()}")
    ac = schedule.alphas_cumprod_at(t)
    alpha = torch.cat([ac.sqrt(), ac.new_ones(1)])
    sigma = torch.cat([(1 - ac).sqrt(), ac.new_zeros(1)])
    lam = alpha.log() - sigma.log()
    return Ladder(t.tolist(), ac.tolist(), alpha.tolist(), sigma.tolist(), lam.tolist())


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def report(callback: Callback | None, ladder: Ladder, i: int, x: torch.Tensor, x0: torch.Tensor) -> None:
    if callback is not None:
        callback(StepInfo(i, ladder.num_steps, ladder.t[i], x, x0))
