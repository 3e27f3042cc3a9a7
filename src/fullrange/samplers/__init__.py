"""Samplers: stateless functions ``fn(denoiser, x, schedule, steps, *, cond, generator, callback, **knobs)``.

Each visits the descending ``steps`` (training timesteps, possibly fractional) in order, reads the next
point from the ladder itself, and returns the model's x0 at the last step. All are finite at zero
terminal SNR: they step from x0 (never dividing by ``sqrt(ᾱ) = 0``) and need no clamp.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

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


__all__ = ["SAMPLERS", "STOCHASTIC", "Callback", "StepInfo", "get", "knobs"]
