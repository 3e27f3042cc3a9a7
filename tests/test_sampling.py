"""``fullrange.sample`` and the sampling spec: the public entry point, recipe checks, step planning."""

import logging

import pytest
import torch

import fullrange
from fullrange import prediction, schedules, timesteps, toy
from fullrange.samplers import SAMPLERS, STOCHASTIC
from fullrange.sampling import STABLE_DIFFUSION, ZERO_TERMINAL_SNR, SamplingSpec

SD = schedules.scaled_linear()
ZTSNR = schedules.rescale_zero_terminal_snr(SD)


def test_oracle_through_a_v_network_and_sample(gen):
    """The public entry point with a diffusers-like network (``model(x_t, t)`` returns v) gives back x0 exactly."""
    x0 = torch.randn(2, 3, 8, 8, generator=gen)

    def model(x_t, t):
        assert t.shape == (2,) and t.dtype == torch.float32
        return prediction.to_v(x0, x_t, ZTSNR.alphas_cumprod_at(t[0].double()).float())

    noise = torch.randn(2, 3, 8, 8, generator=gen)
    for sampler in sorted(set(SAMPLERS) - STOCHASTIC):
        out = fullrange.sample(model, noise, SamplingSpec(ZTSNR, "v_prediction"), sampler=sampler, steps=7)
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_sample_validates_its_options():
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    noise = torch.zeros(1, 3, 4, 4)
    spec = SamplingSpec(SD, "epsilon")
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        fullrange.sample(model, noise, spec, sampler="plms")
    with pytest.raises(ValueError, match="has no option eta"):
        fullrange.sample(model, noise, spec, sampler="euler", eta=1.0)
    with pytest.raises(ValueError, match="strictly descending"):
        fullrange.sample(model, noise, spec, steps=torch.tensor([10, 500]))
    out = fullrange.sample(model, noise, spec, sampler="ddim", eta=0.0, steps=3)
    assert out.shape == noise.shape


def test_spec_refuses_zero_terminal_snr_with_epsilon_and_warns_for_leading_steps():
    with pytest.raises(ValueError, match="zero terminal SNR with epsilon"):
        SamplingSpec(ZTSNR, "epsilon")
    with pytest.raises(ValueError, match="unknown spacing 'uniform'"):
        SamplingSpec(SD, "epsilon", "uniform")
    with pytest.raises(ValueError, match="unknown prediction type 'noise'"):
        SamplingSpec(SD, "noise")
    spec = SamplingSpec(ZTSNR, "v_prediction", "trailing")
    assert spec.plan(10).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    with pytest.warns(UserWarning, match="leading spacing"):
        spec.plan(10, "leading")


def test_spec_plans_as_stable_diffusion_and_lin_et_al():
    """SD samples leading steps + 1 (901 ... 1 for 10 steps); Lin et al.'s fix trailing ones from t = 999."""
    assert STABLE_DIFFUSION.plan(10).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert ZERO_TERMINAL_SNR.plan(10)[0].item() == 999 and ZERO_TERMINAL_SNR.schedule.alphas_cumprod[-1] == 0
    karras = ZERO_TERMINAL_SNR.plan(12, "karras")
    assert karras[0].item() == 999.0 and bool((karras[1:] < karras[:-1]).all())


def test_describe_tells_schedules_apart():
    a, b = STABLE_DIFFUSION.describe(), ZERO_TERMINAL_SNR.describe()
    assert a["schedule"]["name"] == "scaled_linear" and b["schedule"]["zero_terminal_snr"]
    assert a["alphas_cumprod_sha256"] != b["alphas_cumprod_sha256"]
    assert SamplingSpec(schedules.scaled_linear(), "epsilon", "leading", 1).describe() == a


def test_sample_picks_trailing_ddim_and_says_so(caplog, gen):
    """Without a sampler or spacing, every schedule samples with DDIM on trailing steps (the best on the trained
    models of benchmarks/nfe_trained.py), whatever the spec's own spacing; it logs what it picked. The latent-size
    ladder, the exact toys' winner, is one option away."""
    data = toy.MixtureToy()
    noise = torch.randn(2, 4, 16, 16, generator=gen, dtype=torch.float64)

    def model(x_t, t):
        ac = float(ZTSNR.alphas_cumprod_at(float(t[0])))
        return prediction.to_v(data.denoise(x_t, float(t[0]), ac), x_t, ac)

    spec = SamplingSpec(ZTSNR, "v_prediction")
    with caplog.at_level(logging.INFO, logger="fullrange"):
        picked = fullrange.sample(model, noise, spec, steps=6)
    assert "fullrange picked sampler ddim and trailing steps from pure noise" in caplog.text
    trailing = timesteps.plan(ZTSNR, 6, "trailing")
    torch.testing.assert_close(picked, SAMPLERS["ddim"](data.denoise, noise, ZTSNR, trailing), atol=1e-5, rtol=0)
    assert fullrange.sampling.pick(STABLE_DIFFUSION)[:2] == ("ddim", "trailing")  # not SD's own leading
    ladder = timesteps.ladder(ZTSNR, 6, "karras", num_values=4 * 16 * 16)
    unipc = fullrange.sample(model, noise, spec, sampler="unipc", spacing="karras", steps=6)
    torch.testing.assert_close(unipc, SAMPLERS["unipc"](data.denoise, noise, ZTSNR, ladder), atol=1e-5, rtol=0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fullrange"):
        fullrange.sample(model, noise, spec, sampler="ddim", spacing="trailing", steps=3)
    assert caplog.text == ""


@pytest.mark.parametrize("steps", [4.0, torch.tensor(4), True, []])
def test_steps_is_a_count_or_timesteps_never_a_single_step_at_t(steps):
    """``steps=4.0`` (or a 0-d tensor) would be one model call at t = 4: refused. Any integer counts (numpy's too)."""
    import numpy as np

    spec = fullrange.SamplingSpec(schedules.scaled_linear(), "epsilon", "leading", 1)
    calls = []

    def model(x, t):
        calls.append(float(t[0]))
        return torch.zeros_like(x)

    noise = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="steps must be a count"):
        fullrange.sample(model, noise, spec, sampler="ddim", steps=steps)
    fullrange.sample(model, noise, spec, sampler="ddim", steps=np.int64(4), spacing="leading")
    assert calls == [751.0, 501.0, 251.0, 1.0]


def test_guidance_rescale_defaults_to_lin_et_al_at_zero_terminal_snr(caplog, gen):
    """Without ``guidance_rescale``: φ = 0.7 at zero terminal SNR (logged), 0 on a leaky schedule and under CFG++."""
    from fullrange.guidance import Shaping

    noise = torch.randn(2, 4, 8, 8, generator=gen)

    def model(x, t, scale):
        return 0.1 * x * scale.view(-1, 1, 1, 1) + scale.view(-1, 1, 1, 1)

    kwargs = {"sampler": "ddim", "steps": 4, "cond": {"scale": torch.ones(2)}, "uncond": {"scale": torch.zeros(2)}}
    spec = SamplingSpec(ZTSNR, "v_prediction")
    with caplog.at_level(logging.INFO, logger="fullrange"):
        picked = fullrange.sample(model, noise, spec, guidance_scale=5.0, **kwargs)
    assert "guidance rescale 0.7" in caplog.text
    torch.testing.assert_close(
        picked, fullrange.sample(model, noise, spec, guidance_scale=5.0, guidance_rescale=0.7, **kwargs)
    )
    assert not torch.allclose(
        picked, fullrange.sample(model, noise, spec, guidance_scale=5.0, guidance_rescale=0.0, **kwargs)
    )
    assert fullrange.sampling.default_rescale(spec) == 0.7
    assert fullrange.sampling.default_rescale(spec, Shaping(cfg_pp=True)) == 0.0
    assert fullrange.sampling.default_rescale(STABLE_DIFFUSION) == 0.0
