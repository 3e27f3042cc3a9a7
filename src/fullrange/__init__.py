"""fullrange: diffusion models whose outputs reach the full brightness range.

Glossary (DDPM notation, 0-indexed ``t`` in ``0..T-1``):
- ``alphas_cumprod`` (ᾱ_t): signal power at t; ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps``.
- ``snr``: ``ᾱ / (1 - ᾱ)``; zero terminal SNR means ``ᾱ_{T-1} = 0`` (pure noise at the last step).
- ``sigma``: k-diffusion's ``sqrt((1 - ᾱ) / ᾱ)``, infinite at zero SNR.
- ``eps`` / ``v`` / ``x0``: prediction targets, ``v = sqrt(ᾱ) eps - sqrt(1 - ᾱ) x0``.
- spacing: which timesteps a sampler visits (leading / linspace / trailing).
- spec: a model's :class:`SamplingSpec` (schedule, prediction, spacing), what it needs to be sampled right.
"""

from . import guidance, losses, noise, prediction, schedules, timesteps
from .samplers import SAMPLERS
from .sampling import SamplingSpec, sample

__version__ = "0.1.0"
__all__ = [
    "SAMPLERS",
    "SamplingSpec",
    "guidance",
    "losses",
    "noise",
    "prediction",
    "sample",
    "schedules",
    "timesteps",
]
