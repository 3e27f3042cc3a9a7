"""Known bugs of diffusers that fullrange works around, each asserting what would be right upstream.

They are expected to fail (``xfail``, not strict): when diffusers fixes one, it shows as XPASS, and fullrange's own
tests (which check fullrange, not diffusers) are unaffected. fullrange's side of each case is tested beside the code
it concerns (test_samplers, test_diffusers_scheduler, test_guidance).
"""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler

from fullrange import prediction, schedules

ZTSNR = schedules.rescale_zero_terminal_snr(schedules.scaled_linear())
SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _oracle(x0):
    """A v-prediction network that knows x0: any correct sampler returns x0 from it."""

    def network(x_t, t):
        ac = float(ZTSNR.alphas_cumprod_at(float(torch.as_tensor(t).flatten()[0])))
        return prediction.to_v(x0, x_t, ac)

    return network


def _run(scheduler, network, x, steps):
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(network(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(14))
noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(15))


@pytest.mark.xfail(strict=False, reason="diffusers #12633 / #11347: DDIM steps to t - T//S, not to the next step")
def test_diffusers_ddim_with_trailing_steps_returns_x0():
    """With trailing spacing and 7 steps DDIM's last step lands on t = 0, not on x0, so even a model that knows x0
    leaves ``sqrt(1 - ᾱ_0) eps`` of noise."""
    config = {**SD_CONFIG, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    ddim = DDIMScheduler(**config, timestep_spacing="trailing", clip_sample=False)
    torch.testing.assert_close(_run(ddim, _oracle(x0), noise, 7), x0, atol=1e-5, rtol=0)


@pytest.mark.xfail(strict=False, reason="diffusers' HeunDiscreteScheduler at zero terminal SNR: NaN or no step")
def test_diffusers_heun_samples_a_zero_terminal_snr_schedule():
    heun = HeunDiscreteScheduler(
        trained_betas=ZTSNR.betas.numpy(), prediction_type="v_prediction", timestep_spacing="trailing"
    )
    torch.testing.assert_close(_run(heun, _oracle(x0), noise, 7), x0, atol=1e-4, rtol=0)


@pytest.mark.xfail(strict=False, reason="diffusers #12771: DPM++ with Karras sigmas at zero terminal SNR")
def test_diffusers_dpmpp_karras_samples_a_zero_terminal_snr_schedule():
    dpm = DPMSolverMultistepScheduler(
        **SD_CONFIG, rescale_betas_zero_snr=True, prediction_type="v_prediction", use_karras_sigmas=True
    )
    out = _run(dpm, _oracle(x0), noise, 30)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=0)


@pytest.mark.xfail(strict=False, reason="diffusers #13425: rescale_noise_cfg divides by a zero std")
def test_diffusers_guidance_rescale_of_a_constant_prediction_is_finite():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    flat = torch.zeros(1, 4, 8, 8)
    assert torch.isfinite(rescale_noise_cfg(flat, flat, guidance_rescale=0.7)).all()
