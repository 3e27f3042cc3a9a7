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

from ..denoiser import Denoiser
from ..schedules import Schedule
from ._common import Callback, Ladder, prepare, report


def _uni_update(
    lad: Ladder,
    i: int,
    x: torch.Tensor,
    history: list[tuple[float, torch.Tensor]],
    x0_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """UniP (``x0_new`` None) or UniC step from point i to i+1 with ``history`` (λ, x0), newest last.

    Eq. numbers of the paper's Alg. 2/3 (data prediction): ``x' = (σ'/σ) x - α' φ1(h) x0 - α' B(h) Σ ρ_k D_k``,
    ``D_k = (x0_k - x0) / r_k``, ``r_k = (λ_k - λ) / h``; the ρ solve ``R ρ = φ / B(h)``.
    """
    lam, x0 = history[-1]
    h = lad.lam[i + 1] - lam
    hh = -h
    phi_1 = math.expm1(hh)
    b_h = phi_1
    rks, d1s = [], []
    for lam_k, x0_k in reversed(history[:-1]):
        rk = (lam_k - lam) / h
        rks.append(rk)
        d1s.append((x0_k - x0) / rk)
    rks.append(1.0)
    order = len(rks)
    r_rows, b = [], []
    phi_k, factorial = phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        r_rows.append([rk ** (k - 1) for rk in rks])
        b.append(phi_k * factorial / b_h)
        factorial *= k + 1
        phi_k = phi_k / hh - 1 / factorial
    x_next = (lad.sigma[i + 1] / lad.sigma[i]) * x - lad.alpha[i + 1] * phi_1 * x0
    if x0_new is None:
        if order == 1:
            return x_next
        rhos = [0.5] if order == 2 else _solve(r_rows[:-1], b[:-1], order - 1)
        correction = sum(rho * d for rho, d in zip(rhos, d1s, strict=True))
    else:
        rhos = [0.5] if order == 1 else _solve(r_rows, b, order)
        correction = sum(rho * d for rho, d in zip(rhos[:-1], d1s, strict=True)) + rhos[-1] * (x0_new - x0)
    return x_next - lad.alpha[i + 1] * b_h * correction


def _solve(rows: list[list[float]], b: list[float], n: int) -> list[float]:
    matrix = torch.tensor([row[:n] for row in rows], dtype=torch.float64)
    return torch.linalg.solve(matrix, torch.tensor(b, dtype=torch.float64)).tolist()


def unipc(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    steps: torch.Tensor,
    *,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    order: int = 2,
    corrector: bool = True,
) -> torch.Tensor:
    """UniPC-p with UniC (order p + 1 in the paper); order lowered at the start and for the final step
    as in diffusers' ``lower_order_final``."""
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
    lad = prepare(schedule, steps)
    cond = cond or {}
    state = UniPCState()
    for i in range(lad.num_steps):
        x0 = denoiser(x, lad.t[i], lad.alphas_cumprod[i], **cond)
        if corrector:
            x = unipc_correct(lad, i, x, x0, state)
        report(callback, lad, i, x, x0)
        if i == lad.num_steps - 1:
            return x0
        x = unipc_predict(lad, i, x, x0, state, order)
    raise AssertionError("unreachable")


@dataclass
class UniPCState:
    """What UniPC carries between steps: the (λ, x0) history, the part of it the last predictor used, and the
    point it started from."""

    history: list[tuple[float, torch.Tensor]] = field(default_factory=list)
    used: list[tuple[float, torch.Tensor]] = field(default_factory=list)
    x_prev: torch.Tensor | None = None


def unipc_correct(lad: Ladder, i: int, x: torch.Tensor, x0: torch.Tensor, state: UniPCState) -> torch.Tensor:
    """UniC: point i again, from point i-1 with the model's x0 at i (no extra evaluation); ``x`` at the start."""
    if not state.used:
        return x
    return _uni_update(lad, i - 1, state.x_prev, state.used, x0_new=x0)


def unipc_predict(
    lad: Ladder, i: int, x: torch.Tensor, x0: torch.Tensor, state: UniPCState, order: int
) -> torch.Tensor:
    """UniP: point i+1 from point i, with up to ``order`` finite-λ history points (fewer at the start and end)."""
    state.history.append((lad.lam[i], x0))
    finite = [p for p in state.history if math.isfinite(p[0])] or state.history[-1:]
    state.used = finite[-min(order, lad.num_steps - i, len(finite)) :]
    state.x_prev = x
    return _uni_update(lad, i, x, state.used)
