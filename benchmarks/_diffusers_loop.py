"""The reference loop the benchmarks compare against: a diffusers scheduler driven step by step."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler


def run(cls, network, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """SD scaled_linear rescaled to zero terminal SNR, v-prediction, trailing spacing; ``network(x_in, t)``."""
    kwargs = {"clip_sample": False} if cls is DDIMScheduler else {}
    scheduler = cls(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        **kwargs,
    )
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(network(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x
