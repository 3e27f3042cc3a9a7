"""Samplers: stateless functions ``fn(denoiser, x, schedule, steps, *, cond, generator, callback, **knobs)``.

Each visits the descending ``steps`` (training timesteps, possibly fractional) in order, reads the next
point from the ladder itself, and returns the model's x0 at the last step. All are finite at zero
terminal SNR: they step from x0 (never dividing by ``sqrt(ᾱ) = 0``) and need no clamp.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ..denoiser import from_model
from ..guidance import cfg
from ..losses import validate_recipe
from ..schedules import Schedule
from ..timesteps import plan
from ._common import Callback, StepInfo
from .ddim import ddim, ddpm
from .dpmpp import dpmpp_2m, dpmpp_2m_sde
from .euler import euler, euler_ancestral, heun
from .unipc import unipc

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": ddim,
    "ddpm": ddpm,
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "unipc": unipc,
}
STOCHASTIC = frozenset({"ddpm", "euler_ancestral", "dpmpp_2m_sde"})
_COMMON = {"cond", "generator", "callback"}


def get(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def knobs(name: str) -> dict[str, object]:
    """A sampler's own options and their defaults (``eta``, ``order``, ...)."""
    params = inspect.signature(get(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _COMMON}


def sample(
    model,
    noise: torch.Tensor,
    *,
    schedule: Schedule,
    prediction: str,
    sampler: str = "dpmpp_2m",
    steps: int | torch.Tensor = 25,
    spacing: str = "trailing",
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    uncond: dict | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    rescale_space: str = "v",
    callback: Callback | None = None,
    steps_offset: int = 0,
    **options,
) -> torch.Tensor:
    """Sample x0 from ``noise`` (the x_t at the first step) with a network called like a diffusers UNet.

    ``steps``: a count, spaced by ``spacing`` ("leading" / "linspace" / "trailing", or a σ ladder
    "karras" / "exponential"; ``steps_offset`` is added to leading steps, SD uses 1), or an explicit
    descending tensor of timesteps.
    ``cond`` / ``uncond``: keyword tensors for the model (e.g. ``encoder_hidden_states``); with
    ``guidance_scale != 1`` the model also runs on ``uncond`` (classifier-free guidance) and
    ``guidance_rescale`` is Lin et al.'s φ applied in ``rescale_space``.
    ``callback(StepInfo)`` runs after each step (progress bars). Other ``options`` are the sampler's own
    (``fullrange.samplers.knobs(name)``), e.g. ``eta`` for ddim.
    """
    fn = get(sampler)
    unknown = set(options) - set(knobs(sampler))
    if unknown:
        raise ValueError(f"sampler {sampler!r} has no option {', '.join(sorted(unknown))}; it takes {knobs(sampler)}")
    validate_recipe(schedule, prediction, spacing if isinstance(steps, int) else None)
    if isinstance(steps, int):
        steps = plan(schedule, steps, spacing, steps_offset)
    denoiser = from_model(model, prediction)
    if guidance_scale != 1.0:
        denoiser = cfg(denoiser, guidance_scale, uncond, guidance_rescale, rescale_space)
    with torch.no_grad():
        return fn(denoiser, noise, schedule, steps, cond=cond, generator=generator, callback=callback, **options)


__all__ = ["SAMPLERS", "STOCHASTIC", "Callback", "StepInfo", "get", "knobs", "sample"]
