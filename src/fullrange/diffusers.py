"""fullrange's samplers as a diffusers scheduler: :class:`FullrangeScheduler` runs inside diffusers' pipelines.

It reads the schedule, prediction type and spacing from any diffusers scheduler config (zero terminal SNR
included, exactly: no clamp of ᾱ_T) and steps in variance-preserving coordinates, like DDIM: ``init_noise_sigma``
is 1 and ``scale_model_input`` is the identity. Each ``step`` reads the next point from the ladder, never from
``t - T // S``, uses the ``sample`` the pipeline passes (so blends and callbacks that edit the latents between
steps are respected), and the last step returns the model's x0.

    from fullrange.diffusers import FullrangeScheduler
    pipe.scheduler = FullrangeScheduler.from_config(pipe.scheduler.config, sampler="dpmpp_2m", spacing="trailing")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from .prediction import to_eps, to_x0
from .samplers import SAMPLERS, knobs
from .samplers._common import Ladder, prepare
from .samplers.ddim import ddim_step
from .samplers.dpmpp import dpmpp_step
from .samplers.euler import euler_ancestral_step, euler_step
from .samplers.unipc import UniPCState, unipc_correct, unipc_predict
from .sampling import pick
from .scheduler_config import spec_from_config
from .timesteps import LADDERS, SPACINGS

STEPWISE = tuple(SAMPLERS)
"""The samplers the scheduler runs: all of fullrange's."""


@dataclass
class FullrangeSchedulerOutput(BaseOutput):
    """``prev_sample``: x at the next point (x0 after the last step); ``pred_original_sample``: the model's x0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class FullrangeScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs a fullrange sampler (``sampler``, with ``sampler_options`` such as
    ``{"eta": 1.0}``) on any spacing or σ ladder (``spacing``). ``None`` picks as :func:`fullrange.sampling.pick`
    does for latents of ``num_values`` values (C·H·W; SD 1.x/2.x at 512 px by default; SDXL at 1024 px is
    4·128·128): UniPC, and at zero terminal SNR a Karras ladder topped by that size. The other arguments are
    diffusers' own scheduler config keys."""

    _compatibles: ClassVar[list[str]] = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        sampler: str | None = None,
        spacing: str | None = None,
        sampler_options: dict | None = None,
        num_values: int = 4 * 64 * 64,
    ):
        self.spec = spec_from_config(
            {
                "num_train_timesteps": num_train_timesteps,
                "beta_start": beta_start,
                "beta_end": beta_end,
                "beta_schedule": beta_schedule,
                "prediction_type": prediction_type,
                "timestep_spacing": timestep_spacing,
                "steps_offset": steps_offset,
                "rescale_betas_zero_snr": rescale_betas_zero_snr,
            }
        )
        if spacing is not None and spacing not in SPACINGS + LADDERS:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS + LADDERS)}")
        self.sampler, self.spacing, self.note = pick(self.spec, (1, num_values), sampler, spacing)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.note:
            logging.getLogger("fullrange").info(self.note)
        self.options = knobs(self.sampler) | dict(sampler_options or {})
        unknown = set(self.options) - set(knobs(self.sampler))
        if unknown:
            raise ValueError(f"sampler {self.sampler!r} has no option {', '.join(sorted(unknown))}")
        self.order = 2 if self.sampler == "heun" else 1  # diffusers' pipelines read it for img2img's start
        self.init_noise_sigma = 1.0
        self.timesteps = torch.empty(0)
        self.num_inference_steps: int | None = None
        self._ladder: Ladder | None = None
        self._begin_index: int | None = None
        self._step_index: int | None = None
        self._x0_prev: torch.Tensor | None = None
        self._unipc = UniPCState()
        self._points: list[int] = []
        self._heun: tuple | str | None = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Plan ``num_inference_steps`` steps with the scheduler's spacing (fractional timesteps on a σ ladder)."""
        self._plan(self.spec.plan(num_inference_steps, self.spacing, num_values=self.config.num_values), device)

    def _plan(self, steps: torch.Tensor, device: str | torch.device | None) -> None:
        self._ladder = prepare(self.spec.schedule, steps)
        # Heun evaluates twice per step, at the step's start and at its Euler end, so after the first point each
        # point is visited twice, as in diffusers' order-2 schedulers (whose img2img starts at 2 · begin). From
        # σ = ∞ the step is Euler's: the evaluation at its end corrects nothing, and the same point is evaluated
        # again as the next step's start (one evaluation more than fullrange.sample's heun, the same result).
        self._points = list(range(len(steps)))
        if self.sampler == "heun":
            self._points = [0, *(i for i in self._points[1:] for _ in range(2))]
        steps = steps[self._points]
        self.timesteps = (steps if steps.dtype == torch.int64 else steps.float()).to(device)
        self.num_inference_steps = self._ladder.num_steps
        self._begin_index = self._step_index = self._x0_prev = self._heun = None
        self._unipc = UniPCState()

    def use_steps(self, steps: torch.Tensor, device: str | torch.device | None = None) -> None:
        """Visit these descending timesteps (a ladder planned elsewhere, an img2img tail of one) instead of
        :meth:`set_timesteps`' plan."""
        self._plan(steps, device)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at step ``begin_index`` (img2img's strength): its history is empty, so a multistep sampler begins
        first-order there."""
        self._begin_index = begin_index

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """The identity: the samples are variance-preserving ``x_t``, what the network takes."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise`` at (possibly fractional) ``timesteps``, one per sample or shared."""
        t = torch.as_tensor(timesteps).detach().flatten().cpu().to(torch.float64)
        ac = self.spec.schedule.alphas_cumprod_at(t).to(original_samples.device, torch.float32)
        ac = ac.reshape(-1, *(1,) * (original_samples.ndim - 1))
        mixed = ac.sqrt() * original_samples.float() + (1 - ac).sqrt() * noise.float()
        return mixed.to(original_samples.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> FullrangeSchedulerOutput | tuple:
        """One step of the sampler from ``sample`` at ``timestep`` to the next point of the ladder (in float32)."""
        if self._ladder is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = self._index_of(timestep) if self._begin_index is None else self._begin_index
        lad, i = self._ladder, self._points[self._step_index]
        x = sample.float()
        x0 = to_x0(self.spec.prediction, model_output.float(), x, lad.alphas_cumprod[i])
        if self._heun == "from infinity":  # the end of an Euler step from σ = ∞: nothing to correct
            prev, self._heun = x, None
        elif self._heun is not None:  # Heun's second evaluation, at the end of its Euler step from point j
            j, x_j, x0_j, d_j = self._heun
            d = (d_j + to_eps(x0, x, lad.alphas_cumprod[i])) / 2
            prev, self._heun = euler_step(lad, j, x_j, x0_j, d, lad.ve_sigma(j + 1)), None
        elif i == lad.num_steps - 1:
            prev = x0
        elif self.sampler in ("ddim", "ddpm"):
            eta = 1.0 if self.sampler == "ddpm" else self.options["eta"]
            prev = ddim_step(lad, i, x, x0, eta, generator)
        elif self.sampler == "heun" and lad.alpha[i] > 0:
            d = to_eps(x0, x, lad.alphas_cumprod[i])
            prev = euler_step(lad, i, x, x0, d, lad.ve_sigma(i + 1))
            self._heun = (i, x, x0, d)
        elif self.sampler in ("euler", "heun"):
            prev = euler_step(lad, i, x, x0, to_eps(x0, x, lad.alphas_cumprod[i]), lad.ve_sigma(i + 1))
            self._heun = "from infinity" if self.sampler == "heun" else None
        elif self.sampler == "euler_ancestral":
            prev = euler_ancestral_step(lad, i, x, x0, self.options["eta"], generator)
        elif self.sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
            eta = 0.0 if self.sampler == "dpmpp_2m" else self.options["eta"]
            prev = dpmpp_step(lad, i, x, x0, self._x0_prev, eta, generator)
        else:  # unipc
            if self.options["corrector"]:
                x = unipc_correct(lad, i, x, x0, self._unipc)
            prev = unipc_predict(lad, i, x, x0, self._unipc, self.options["order"])
        self._x0_prev = x0
        self._step_index += 1
        out = (prev.to(sample.dtype), x0.to(sample.dtype))
        return FullrangeSchedulerOutput(*out) if return_dict else out

    def _index_of(self, timestep: float | torch.Tensor) -> int:
        t = float(torch.as_tensor(timestep).flatten()[0])
        matches = (self.timesteps.double().cpu() - t).abs() < 1e-3
        if not bool(matches.any()):
            raise ValueError(f"timestep {t:g} is not one of this scheduler's steps {self.timesteps.tolist()}")
        return int(matches.nonzero()[0])

    def __len__(self) -> int:
        return self.config.num_train_timesteps
