"""Sample steps: which training timesteps a sampler visits.

Every function returns one descending tensor of timesteps; samplers visit each and, after the last,
return the model's x0 (the implicit final point is the clean image, ᾱ = 1).
Spacings follow Lin et al. 2024, Table 2; σ ladders follow Karras et al. 2022 (eq. 5).
"""

from __future__ import annotations

import math

import torch

from .metrics import mean_leak
from .schedules import RectifiedFlow, Schedule, shift_time

SPACINGS = ("leading", "linspace", "trailing")
LADDERS = ("karras", "exponential")

ZTSNR_SIGMA_MAX = 80.0
"""Top of a σ ladder on a zero-terminal-SNR schedule, below its first step at σ = ∞.

At SNR = 0 the schedule's largest finite σ (2254 at t = 998 for rescaled SD) is an artefact of the
rescale, and a ladder starting there spends most steps at t > 990. 80 is EDM's σ_max: for data of
std 0.5 the signal is then 4e-5 of the noise, so nothing is skipped (t ≈ 972 for rescaled SD).
"""


def resolution_sigma_max(num_values: int) -> float:
    """Top of a σ ladder for samples of ``num_values`` values (C·H·W): ``2 sqrt(num_values)``.

    The mean of D values of ``x_t`` has its own SNR, ``D · SNR(t)`` (the noise's mean has variance 1/D), so an
    image's brightness is decided near ``D · SNR = 1``, i.e. σ = sqrt(D) for data of unit scale. A ladder whose
    first finite step is at twice that σ (``D · SNR = 1/4``) leaves that decision to the model instead of to the
    jump from SNR = 0; at 3×32×32 it is 111, at SD's 4×64×64 256, at SDXL's 4×128×128 512.
    """
    if num_values < 1:
        raise ValueError(f"num_values must be positive, got {num_values}")
    return 2.0 * math.sqrt(num_values)


def spaced(num_train_timesteps: int, num_steps: int, spacing: str = "trailing", steps_offset: int = 0) -> torch.Tensor:
    """Integer timesteps, descending, spaced as in Lin et al. Table 2 (and diffusers' ``timestep_spacing``).

    leading: ``k·(T//S) + steps_offset``; linspace: ``round(linspace(0, T-1, S))``;
    trailing: ``round(T - k·T/S) - 1``. Only linspace and trailing include t = T-1.
    """
    T, S = num_train_timesteps, num_steps
    if T < 1:
        raise ValueError(f"num_train_timesteps must be positive, got {T}")
    if not 1 <= S <= T:
        raise ValueError(f"steps must be between 1 and num_train_timesteps={T}, got {S}")
    k = torch.arange(S, dtype=torch.float64)
    if spacing == "leading":
        t = k * (T // S) + steps_offset
    elif spacing == "linspace":
        t = torch.linspace(0, T - 1, S, dtype=torch.float64).round()
    elif spacing == "trailing":
        t = (T - k * (T / S)).round() - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    t = t.sort(descending=True).values.long()
    if int(t[0]) > T - 1 or int(t[-1]) < 0:
        raise ValueError(f"steps_offset={steps_offset} puts timesteps outside [0, {T - 1}]")
    return t


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. eq. 5: ``(σ_max^(1/ρ) + k/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ``, descending."""
    _check_range(sigma_min, sigma_max, num_steps)
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact ends: the roots' round trip drifts by ~1e-15
    return sigmas


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> torch.Tensor:
    """σ evenly spaced in log σ (i.e. in log SNR), descending."""
    _check_range(sigma_min, sigma_max, num_steps)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64).exp()
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas


def ladder(
    schedule: Schedule,
    num_steps: int,
    kind: str = "karras",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    num_values: int | None = None,
) -> torch.Tensor:
    """Fractional timesteps of a σ ladder on ``schedule``, descending.

    The range defaults to the schedule's own ``[σ(0), σ(T-1)]``. On a zero-terminal-SNR schedule the first step is
    its last timestep (σ = ∞, pure noise: t = T-1, or T for rectified flow) and the other ``num_steps - 1`` follow
    the ladder from ``sigma_max`` down: by default :func:`resolution_sigma_max` of ``num_values`` (the sample's
    C·H·W) when given, else :data:`ZTSNR_SIGMA_MAX`; never above the schedule's largest finite σ.
    """
    if kind not in LADDERS:
        raise ValueError(f"unknown ladder {kind!r}; choose one of {', '.join(LADDERS)}")
    sigmas = schedule.sigmas
    if sigma_min is None:
        sigma_min = float(sigmas[0])
    ztsnr = schedule.zero_terminal_snr
    if sigma_max is None:
        top = ZTSNR_SIGMA_MAX if num_values is None else resolution_sigma_max(num_values)
        sigma_max = min(top, float(sigmas[-2])) if ztsnr else float(sigmas[-1])
    n = num_steps - 1 if ztsnr else num_steps
    if n < 1:
        raise ValueError("a ladder on a zero-terminal-SNR schedule needs at least 2 steps")
    if kind == "karras":
        ladder_sigmas = karras_sigmas(sigma_min, sigma_max, n, rho)
    else:
        ladder_sigmas = exponential_sigmas(sigma_min, sigma_max, n)
    t = schedule.sigma_to_t(ladder_sigmas)
    if ztsnr:
        t = torch.cat([schedule.timesteps[-1:], t])
    return t


def flow_steps(schedule: RectifiedFlow, num_steps: int, shift: float | None = None) -> torch.Tensor:
    """Rectified flow's steps: ``tau = 1 - k / S`` for ``k = 0..S-1`` (from pure noise, evenly spaced; Flux's and
    diffusers' ``FlowMatchEulerDiscreteScheduler`` with these sigmas), time-shifted by ``shift`` (default the
    schedule's, :func:`fullrange.schedules.shift_time`), as continuous ``t = T tau``, descending."""
    if num_steps < 1:
        raise ValueError(f"steps must be positive, got {num_steps}")
    tau = 1 - torch.arange(num_steps, dtype=torch.float64) / num_steps
    return schedule.num_train_timesteps * shift_time(tau, schedule.shift if shift is None else shift)


def plan(
    schedule: Schedule,
    num_steps: int,
    spacing: str = "trailing",
    steps_offset: int = 0,
    num_values: int | None = None,
) -> torch.Tensor:
    """The steps a sampler visits: ``spaced`` for leading / linspace / trailing (``steps_offset`` applies to
    leading only, as in diffusers), ``ladder`` for karras / exponential (topped by ``num_values``, see there).
    Rectified flow takes trailing steps (:func:`flow_steps`, with its shift) or a ladder."""
    if spacing in LADDERS:
        return ladder(schedule, num_steps, spacing, num_values=num_values)
    if isinstance(schedule, RectifiedFlow):
        if spacing != "trailing":
            raise ValueError(f"rectified flow is sampled with trailing steps or a σ ladder, not {spacing!r}")
        return flow_steps(schedule, num_steps)
    offset = steps_offset if spacing == "leading" else 0
    return spaced(schedule.num_train_timesteps, num_steps, spacing, offset)


def describe_plan(
    schedule: Schedule, num_steps: int, spacing: str = "trailing", steps_offset: int = 0, num_values: int = 4 * 64 * 64
) -> list[dict]:
    """Per sample step of :func:`plan`: its index, ``t``, ``alphas_cumprod``, ``snr``, ``sigma`` (k-diffusion's,
    ``None`` at SNR = 0) and the ``mean_leak`` √(SNR·N) of samples of ``num_values`` values
    (:func:`fullrange.metrics.mean_leak`)."""
    t = plan(schedule, num_steps, spacing, steps_offset, num_values).double()
    ac = schedule.alphas_cumprod_at(t)
    snr = ac / (1 - ac)
    leak = mean_leak(snr, num_values)
    return [
        {
            "step": i,
            "t": round(float(t[i]), 3),
            "alphas_cumprod": float(ac[i]),
            "snr": float(snr[i]),
            "sigma": None if snr[i] == 0 else float(snr[i].rsqrt()),
            "mean_leak": float(leak[i]),
        }
        for i in range(len(t))
    ]


def _check_range(sigma_min: float, sigma_max: float, num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"steps must be positive, got {num_steps}")
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min} and {sigma_max}")
