"""The reference loop the benchmarks compare against: a diffusers scheduler driven step by step."""

from __future__ import annotations

import inspect

import torch
from diffusers import DDIMScheduler

from fullrange import prediction, schedules


def as_v_network(data, schedule):
    """A toy's exact denoiser as a v-prediction network ``network(x_in, t)``; t may be fractional, a number or a
    tensor shared by the batch."""

    def network(x_in, t):
        t = float(torch.as_tensor(t).flatten()[0])
        ac = float(schedule.alphas_cumprod_at(t))
        return prediction.to_v(data.denoise(x_in, t, ac), x_in, ac)

    return network


def run(cls, network, noise: torch.Tensor, steps: int, **config) -> torch.Tensor:
    """SD scaled_linear rescaled to zero terminal SNR, v-prediction, trailing spacing (``config`` adds to or
    overrides the scheduler's config); ``network(x_in, t)``. A scheduler without ``rescale_betas_zero_snr``
    (Heun) is given the rescaled betas as ``trained_betas``."""
    kwargs = ({"clip_sample": False} if cls is DDIMScheduler else {}) | config
    if "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters:
        kwargs["rescale_betas_zero_snr"] = True
    else:
        zero_snr = schedules.rescale_zero_terminal_snr(schedules.scaled_linear())
        kwargs["trained_betas"] = zero_snr.betas.numpy()
    scheduler = cls(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        **kwargs,
    )
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(network(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x
