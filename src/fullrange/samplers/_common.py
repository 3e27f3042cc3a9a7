"""What every sampler shares: the ladder's coefficients (float64), the stepper contract, the one loop, and the
record that makes a stepper a solver."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..denoiser import Denoiser
from ..schedules import Schedule


@dataclass(frozen=True)
class StepInfo:
    """Passed to ``callback`` after each step's first model evaluation: step ``i`` of ``num_steps`` at timestep
    ``t``, the ``x`` the model saw and its ``x0``."""

    i: int
    num_steps: int
    t: float
    x: torch.Tensor
    x0: torch.Tensor


Callback = Callable[[StepInfo], None]
Hook = Callable[[torch.Tensor, float], torch.Tensor]
"""``hook(x, alpha_cumprod) -> x``: edits the latents after every step, ``alpha_cumprod`` being the ᾱ of the point
they are at (1 for the clean image after the last step); blended inpainting is one."""


@dataclass(frozen=True)
class Ladder:
    """Coefficients of the visited steps, plain floats computed in float64.

    ``a = sqrt(ᾱ)``, ``s = sqrt(1 - ᾱ)`` (``x_t = a x0 + s eps``), ``lam = log(a / s)`` (half log-SNR, -inf at
    SNR = 0). They have ``S + 1`` entries: the last is the clean image (a = 1, s = 0, lam = +inf). ``t`` and
    ``alphas_cumprod`` have the ``S`` visited entries.
    """

    t: list[float]
    alphas_cumprod: list[float]
    a: list[float]
    s: list[float]
    lam: list[float]

    @property
    def num_steps(self) -> int:
        return len(self.t)

    def sigma(self, i: int) -> float:
        """k-diffusion's ``σ = s / a`` at point i (inf at SNR = 0, 0 at the clean end)."""
        return math.inf if self.a[i] == 0 else self.s[i] / self.a[i]


def prepare(schedule: Schedule, steps: torch.Tensor) -> Ladder:
    """Check that ``steps`` descend strictly and read their ᾱ from ``schedule``."""
    t = torch.as_tensor(steps).detach().cpu().to(torch.float64).flatten()
    if t.numel() == 0:
        raise ValueError("steps is empty")
    if t.numel() > 1 and not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"steps must be strictly descending, got {t.tolist()}")
    ac = schedule.alphas_cumprod_at(t)
    a = torch.cat([ac.sqrt(), ac.new_ones(1)])
    s = torch.cat([(1 - ac).sqrt(), ac.new_zeros(1)])
    lam = a.log() - s.log()
    return Ladder(t.tolist(), ac.tolist(), a.tolist(), s.tolist(), lam.tolist())


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@dataclass(eq=False)
class Stepper:
    """One sampler's state on a ladder and its step. ``i`` is the point x is at, where the model is evaluated next;
    :meth:`step` takes the model's x0 there and returns x at the sampler's next evaluation point. A step evaluates
    the model ``evaluations`` times; :attr:`at_start` is False between them (Heun's correction)."""

    ladder: Ladder
    i: int = 0
    evaluations: ClassVar[int] = 1

    @property
    def at_start(self) -> bool:
        return True

    def step(self, x: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


def solve(
    stepper: Stepper,
    denoiser: Denoiser,
    x: torch.Tensor,
    cond: dict,
    generator: torch.Generator | None,
    callback: Callback | None,
    hook: Hook | None,
) -> torch.Tensor:
    """The loop of every sampler: evaluate the model where the stepper is, report the step's first evaluation, step,
    apply the hook; at the last point return the model's x0 (the hook applied at ᾱ = 1)."""
    lad = stepper.ladder
    while True:
        i = stepper.i
        x0 = denoiser(x, lad.t[i], lad.alphas_cumprod[i], **cond)
        if stepper.at_start:
            if callback is not None:
                callback(StepInfo(i, lad.num_steps, lad.t[i], x, x0))
            if i == lad.num_steps - 1:
                return x0 if hook is None else hook(x0, 1.0)
        x = stepper.step(x, x0, generator)
        if hook is not None:
            x = hook(x, lad.alphas_cumprod[stepper.i])


@dataclass(frozen=True)
class Sampler:
    """A solver made of a stepper: called as ``sampler(denoiser, x, schedule, steps, *, cond, generator, callback,
    hook, **knobs)`` it visits the descending ``steps`` and returns the model's x0 at the last one. ``fixed`` are
    knobs this sampler sets for its stepper (DDPM is DDIM at η = 1) and does not take."""

    stepper: type[Stepper]
    fixed: dict = dataclasses.field(default_factory=dict)

    @property
    def knobs(self) -> dict[str, object]:
        """The sampler's own options and their defaults (``eta``, ``order``, ...)."""
        own = (f for f in dataclasses.fields(self.stepper) if f.init and f.name not in ("ladder", "i"))
        return {f.name: f.default for f in own if f.name not in self.fixed}

    def make(self, ladder: Ladder, i: int = 0, **knobs) -> Stepper:
        """The stepper on ``ladder`` from point ``i``, with ``knobs`` (checked by :func:`fullrange.samplers.get`)."""
        return self.stepper(ladder, i, **knobs, **self.fixed)

    def __call__(
        self,
        denoiser: Denoiser,
        x: torch.Tensor,
        schedule: Schedule,
        steps: torch.Tensor,
        *,
        cond: dict | None = None,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        hook: Hook | None = None,
        **knobs,
    ) -> torch.Tensor:
        stepper = self.make(prepare(schedule, steps), **knobs)
        return solve(stepper, denoiser, x, cond or {}, generator, callback, hook)
