"""UniPC (Zhao et al. 2023, arXiv:2302.04867): predictor UniP-p and corrector UniC, B(h) = e^h - 1 ("bh2"),
data prediction, VP coordinates.

The corrector reuses the evaluation at the new point, so it costs no extra model call. A history point at
SNR = 0 (λ = -inf) carries no slope information and is left out of the multistep terms, so the first
step is DDIM's and no clamp is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ._common import Ladder, Stepper


def _uni_update(
    lad: Ladder,
    i: int,
    x: torch.Tensor,
    history: list[tuple[float, torch.Tensor]],
    x0_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """UniP (``x0_new`` None) or UniC step from point i to i+1 with ``history`` (λ, x0), newest last.

    The paper's Alg. 2/3 in data prediction: ``x' = (s'/s) x - a' φ1(h) x0 - a' B(h) Σ ρ_k D_k`` with
    ``D_k = (x0_k - x0) / r_k`` and ``r_k = (λ_k - λ) / h``; the ρ solve ``R ρ = φ / B(h)``.
    """
    lam, x0 = history[-1]
    h = lad.lam[i + 1] - lam
    hh = -h  # data prediction integrates in -λ
    phi_1 = math.expm1(hh)  # φ1(h) = e^{-h} - 1
    b_h = phi_1  # B(h) = e^h - 1 in -λ ("bh2")
    rks, d1s = [], []
    for lam_k, x0_k in reversed(history[:-1]):
        rk = (lam_k - lam) / h
        rks.append(rk)
        d1s.append((x0_k - x0) / rk)
    rks.append(1.0)
    order = len(rks)
    # Row k of R holds r^(k-1); the right-hand side is k! h φ_{k+1}(h) / B(h) (h in -λ here), with the paper's
    # recursion φ_{k+1} = (φ_k - 1/k!) / h from φ_1 = (e^h - 1) / h.
    r_rows, b = [], []
    phi_k, factorial = phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        r_rows.append([rk ** (k - 1) for rk in rks])
        b.append(phi_k * factorial / b_h)
        factorial *= k + 1
        phi_k = phi_k / hh - 1 / factorial
    x_next = (lad.s[i + 1] / lad.s[i]) * x - lad.a[i + 1] * phi_1 * x0
    if x0_new is None:  # UniP: the history's differences only; at order 2 ρ = 1/2 (the paper's fixed choice)
        if order == 1:
            return x_next
        rhos = [0.5] if order == 2 else _solve(r_rows[:-1], b[:-1], order - 1)
        correction = sum(rho * d for rho, d in zip(rhos, d1s, strict=True))
    else:  # UniC: the new point's x0 is the last difference (r = 1)
        rhos = [0.5] if order == 1 else _solve(r_rows, b, order)
        correction = sum(rho * d for rho, d in zip(rhos[:-1], d1s, strict=True)) + rhos[-1] * (x0_new - x0)
    return x_next - lad.a[i + 1] * b_h * correction


def _solve(rows: list[list[float]], b: list[float], n: int) -> list[float]:
    matrix = torch.tensor([row[:n] for row in rows], dtype=torch.float64)
    return torch.linalg.solve(matrix, torch.tensor(b, dtype=torch.float64)).tolist()


@dataclass(eq=False)
class UniPC(Stepper):
    """UniPC-p with UniC (order p + 1 in the paper); the order is lowered at the start and for the final step, as
    diffusers' ``lower_order_final`` does. The corrector first redoes the step that led here with the x0 just
    evaluated, then the predictor steps on."""

    order: int = 2
    corrector: bool = True
    _history: list = field(default_factory=list, init=False, repr=False)
    """(λ, x0) of every point so far, newest last."""
    _used: list = field(default_factory=list, init=False, repr=False)
    """The part of the history the last predictor used, and the point it started from (``_x_prev``)."""
    _x_prev: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.order not in (1, 2, 3):
            raise ValueError(f"unipc order must be 1, 2 or 3, got {self.order}")

    def step(self, x: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        lad, i = self.ladder, self.i
        self.i += 1
        if self.corrector and self._used:  # UniC: point i again, from point i-1, with the x0 evaluated at i
            x = _uni_update(lad, i - 1, self._x_prev, self._used, x0_new=x0)
        self._history.append((lad.lam[i], x0))
        finite = [p for p in self._history if math.isfinite(p[0])] or self._history[-1:]
        self._used = finite[-min(self.order, lad.num_steps - i, len(finite)) :]
        self._x_prev = x
        return _uni_update(lad, i, x, self._used)
