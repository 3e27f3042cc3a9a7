"""Samplers: solvers ``sampler(denoiser, x, schedule, steps, *, cond, generator, callback, hook, **knobs)``.

Each is a :class:`Sampler` made of one :class:`Stepper` (its state and one step), which the shared loop, the diffusers
scheduler (:mod:`fullrange.diffusers`) and per-step hooks all use. A sampler visits the descending ``steps``
(training timesteps, possibly fractional) in order, reads the next point from the ladder itself, and returns the
model's x0 at the last step. All are finite at zero terminal SNR: they step from x0 (never dividing by
``sqrt(ᾱ) = 0``) and need no clamp.
"""

from __future__ import annotations

from ._common import Callback, Hook, Sampler, StepInfo, Stepper, prepare
from .ddim import DDIM
from .dpmpp import DPMSolverPP
from .euler import Euler, EulerAncestral, Heun
from .unipc import UniPC

SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(DDIM),
    "ddpm": Sampler(DDIM, fixed={"eta": 1.0}),
    "euler": Sampler(Euler),
    "euler_ancestral": Sampler(EulerAncestral),
    "heun": Sampler(Heun),
    "dpmpp_2m": Sampler(DPMSolverPP, fixed={"eta": 0.0}),
    "dpmpp_2m_sde": Sampler(DPMSolverPP),
    "unipc": Sampler(UniPC),
}
STOCHASTIC = frozenset({"ddpm", "euler_ancestral", "dpmpp_2m_sde"})


def get(name: str, knobs: dict | None = None) -> Sampler:
    """The sampler called ``name``, which must take every one of ``knobs`` (a ValueError names what is wrong)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[name]
    unknown = set(knobs or {}) - set(sampler.knobs)
    if unknown:
        raise ValueError(f"sampler {name!r} has no option {', '.join(sorted(unknown))}; it takes {sampler.knobs}")
    return sampler


__all__ = ["SAMPLERS", "STOCHASTIC", "Callback", "Hook", "Sampler", "StepInfo", "Stepper", "get", "prepare"]
