"""fullrange's samplers as a diffusers scheduler: :class:`FullrangeScheduler` runs inside diffusers' pipelines.

It reads the schedule, prediction type and spacing from any diffusers scheduler config (zero terminal SNR
included, exactly: no clamp of ᾱ_T) and steps in variance-preserving coordinates, like DDIM: ``init_noise_sigma``
is 1 and ``scale_model_input`` is the identity. Each ``step`` reads the next point from the ladder, never from
``t - T // S``, uses the ``sample`` the pipeline passes (so blends and callbacks that edit the latents between
steps are respected), and the last step returns the model's x0.

    from fullrange.diffusers import FullrangeScheduler
    pipe.scheduler = FullrangeScheduler.from_config(pipe.scheduler.config, sampler="dpmpp_2m", spacing="trailing")

A pipeline combines guidance's two branches itself; :func:`guide` puts fullrange's guidance (the rescale in v space,
:class:`fullrange.guidance.Shaping`) in its place.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from .guidance import Shaping, cfg
from .prediction import from_flow_input, from_x0, to_flow_input, to_x0
from .samplers import Stepper, get
from .samplers._common import Ladder, prepare
from .sampling import pick
from .scheduler_config import flow_shift_from_config, flow_spec_from_config, is_flow_config, spec_from_config
from .schedules import shift_time, with_shift
from .timesteps import LADDERS, SPACINGS


@dataclass
class FullrangeSchedulerOutput(BaseOutput):
    """``prev_sample``: x at the next point (x0 after the last step); ``pred_original_sample``: the model's x0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class FullrangeScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs a fullrange sampler (``sampler``, with ``sampler_options`` such as
    ``{"eta": 1.0}``) on any spacing or σ ladder (``spacing``). ``None`` picks as :func:`fullrange.sampling.pick`
    does: DDIM on trailing steps. ``num_values`` (C·H·W; SD 1.x/2.x at 512 px by default; SDXL at 1024 px is
    4·128·128) tops the σ ladders ("karras", "exponential") at zero terminal SNR. The other arguments are diffusers'
    own scheduler config keys."""

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
        self._setup(sampler, spacing, sampler_options)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``; a flow-matching config (SD3, Flux) gives a :class:`FullrangeFlowScheduler`."""
        if cls is FullrangeScheduler and config is not None and is_flow_config(dict(config)):
            return FullrangeFlowScheduler.from_config(config, return_unused_kwargs, **kwargs)
        return super().from_config(config, return_unused_kwargs, **kwargs)

    def _setup(self, sampler: str | None, spacing: str | None, sampler_options: dict | None) -> None:
        if spacing is not None and spacing not in SPACINGS + LADDERS:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS + LADDERS)}")
        self.sampler, self.spacing, self.note = pick(self.spec, sampler, spacing)
        self._solver = get(self.sampler, sampler_options)
        if self.note:
            logging.getLogger("fullrange").info(self.note)
        self.options = dict(sampler_options or {})
        self.order = self._solver.stepper.evaluations  # diffusers' pipelines read it for img2img's start
        self.init_noise_sigma = 1.0
        self.timesteps = torch.empty(0)
        self.num_inference_steps: int | None = None
        self._ladder: Ladder | None = None
        self._points: list[int] = []
        self._begin_index: int | None = None
        self._step_index: int | None = None
        self._stepper: Stepper | None = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Plan ``num_inference_steps`` steps with the scheduler's spacing (fractional timesteps on a σ ladder)."""
        self._plan(self.spec.plan(num_inference_steps, self.spacing, num_values=self.config.num_values), device)

    def _plan(self, steps: torch.Tensor, device: str | torch.device | None) -> None:
        self._ladder = prepare(self.spec.schedule, steps)
        # A sampler of k evaluations per step visits every point after the first k times, as diffusers' order-2
        # schedulers lay out Heun (its img2img starts at 2 · begin).
        self._points = [0, *(i for i in range(1, len(steps)) for _ in range(self.order))]
        steps = steps[self._points]
        self.timesteps = (steps if steps.dtype == torch.int64 else steps.float()).to(device)
        self.num_inference_steps = self._ladder.num_steps
        self._begin_index = self._step_index = self._stepper = None

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
        k, lad = self._step_index, self._ladder
        i = self._points[k]
        if self._stepper is None:  # at the first step, or img2img's begin: no history yet
            self._stepper = self._solver.make(lad, i, **self.options)
        flow = self.spec.schedule.coordinates == "flow"  # the pipeline's latents are the flow interpolant
        x = from_flow_input(sample.float(), lad.alphas_cumprod[i]) if flow else sample.float()
        x0 = to_x0(self.spec.prediction, model_output.float(), x, lad.alphas_cumprod[i])
        stepper = self._stepper
        if stepper.at_start and self._points[k + 1 : k + 2] == [i]:
            # The layout evaluates this point twice, but a step from σ = ∞ (Heun's Euler step) has nothing to
            # correct: the first evaluation leaves x as it is, the second starts the next step.
            prev = x
        elif stepper.at_start and i == lad.num_steps - 1:
            prev = x0
        else:
            prev = stepper.step(x, x0, generator)
            if flow:
                prev = to_flow_input(prev, lad.alphas_cumprod[stepper.i])
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


class FullrangeFlowScheduler(FullrangeScheduler):
    """:class:`FullrangeScheduler` for rectified-flow models (SD3, Flux): it reads a ``FlowMatchEulerDiscreteScheduler``
    config (``shift``, or ``use_dynamic_shifting`` with the ``mu`` the pipeline passes) and keeps the pipeline's
    latents in flow coordinates, ``(1 - tau) x0 + tau eps``, stepping in variance-preserving ones.

    Steps: the ``sigmas`` a pipeline passes (Flux's ``linspace(1, 1/S, S)``), shifted as diffusers does; without them
    :func:`fullrange.timesteps.flow_steps` (the same sigmas; diffusers' own default for SD3 ends at 1/T shifted
    twice) or a σ ladder (``spacing="karras"``, unshifted). DDIM (the default) is diffusers' flow-matching Euler step
    exactly.

        pipe.scheduler = FullrangeFlowScheduler.from_config(pipe.scheduler.config, sampler="unipc")
    """

    _compatibles: ClassVar[list[str]] = ["FlowMatchEulerDiscreteScheduler"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        invert_sigmas: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        sampler: str | None = None,
        spacing: str | None = None,
        sampler_options: dict | None = None,
        num_values: int = 16 * 128 * 128,
    ):
        self.spec = flow_spec_from_config(dict(self.config))
        self._setup(sampler, spacing, sampler_options)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """Plan the steps: explicit ``timesteps``, the pipeline's ``sigmas`` shifted, or ``num_inference_steps`` of
        the scheduler's spacing; ``mu`` is Flux's dynamic shift (required with ``use_dynamic_shifting``)."""
        shift = flow_shift_from_config(dict(self.config), mu)
        self.spec = replace(self.spec, schedule=with_shift(self.spec.schedule, shift))
        T = self.config.num_train_timesteps
        if timesteps is not None:
            steps = torch.as_tensor(timesteps, dtype=torch.float64)
        elif sigmas is not None:
            steps = T * shift_time(torch.as_tensor(sigmas, dtype=torch.float64), shift)
        elif num_inference_steps is None:
            raise ValueError("give num_inference_steps, sigmas or timesteps")
        else:
            steps = self.spec.plan(num_inference_steps, self.spacing, num_values=self.config.num_values)
        self._plan(steps, device)

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The flow interpolant ``(1 - tau) sample + tau noise`` at ``timestep`` (img2img's start)."""
        t = torch.as_tensor(timestep).detach().flatten().cpu().to(torch.float64)
        tau = (t / self.config.num_train_timesteps).to(sample.device, torch.float32)
        tau = tau.reshape(-1, *(1,) * (sample.ndim - 1))
        return ((1 - tau) * sample.float() + tau * noise.float()).to(sample.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """:meth:`scale_noise` under the name SD's img2img and inpainting pipelines call (flow coordinates)."""
        return self.scale_noise(original_samples, timesteps, noise)


def guide(pipe, shaping: Shaping | None = None, space: str = "v") -> torch.utils.hooks.RemovableHandle:
    """fullrange's guidance inside a diffusers pipeline (SD, SDXL, img2img, ControlNet: any that batches the negative
    prompt first and combines ``u + w (c - u)`` itself).

    A forward hook on ``pipe.unet`` takes the UNet's two halves and returns fullrange's guided output in both, so
    that the pipeline's combination and its own rescale (of ``g`` against ``g``) leave it as it is. It reads the
    ``guidance_scale`` and ``guidance_rescale`` the pipeline is called with, applies the rescale in ``space`` (v, the
    paper's, by default; :func:`fullrange.guidance.cfg`) and ``shaping``, at the ᾱ of the pipeline's scheduler. APG's
    momentum and CFG-Zero*'s zero-init count steps from the first timestep of each call. CFG++ is refused: it needs
    the sampler's next step, which only ``fullrange.sample`` knows. ``handle.remove()`` restores the pipeline."""
    if shaping is not None and shaping.cfg_pp:
        raise ValueError("CFG++ changes the sampler's step, which a hook on the UNet cannot see: use fullrange.sample")
    run: dict = {"last": -math.inf}

    def hook(module, args, kwargs, output):
        if not getattr(pipe, "do_classifier_free_guidance", False):
            return output
        x = (args[0] if args else kwargs["sample"]).float()
        t = float(torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).flatten()[0])
        raw = output[0] if isinstance(output, tuple) else output.sample
        if t > run["last"]:  # a new call of the pipeline: its scheduler and scales, fresh momentum and step count
            scheduler = pipe.scheduler
            is_ours = isinstance(scheduler, FullrangeScheduler)
            run["spec"] = scheduler.spec if is_ours else spec_from_config(scheduler.config)
            scale, phi = pipe.guidance_scale, getattr(pipe, "guidance_rescale", 0.0)
            run["guided"] = cfg(_branches(run), scale, None, phi, space, shaping)
        run["last"], spec = t, run["spec"]
        ac = float(spec.schedule.alphas_cumprod_at(torch.tensor([t], dtype=torch.float64))[0])
        if spec.schedule.coordinates == "flow":  # a flow UNet's input is the interpolant; the guidance is in VP terms
            x = from_flow_input(x, ac)
        run["pair"] = to_x0(spec.prediction, raw.float(), x, ac).chunk(2)  # negative first, as pipelines batch
        half = x[: len(x) // 2]
        out = from_x0(spec.prediction, run["guided"](half, t, ac), half, ac).to(raw.dtype)
        out = torch.cat([out, out])
        return (out,) if isinstance(output, tuple) else type(output)(sample=out)

    return pipe.unet.register_forward_hook(hook, with_kwargs=True)


def _branches(run: dict):
    """A denoiser giving the UNet's x0 predictions of this step: both branches when called on both, else the
    positive one (a guidance interval's unguided steps)."""

    def denoise(x: torch.Tensor, t: float, alpha_cumprod: float) -> torch.Tensor:
        negative, positive = run["pair"]
        return torch.cat([negative, positive]) if len(x) == 2 * len(positive) else positive

    return denoise
