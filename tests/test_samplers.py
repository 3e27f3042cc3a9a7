"""Samplers checked against closed forms (exact toy denoisers), each other, and diffusers' schedulers."""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from fullrange import metrics, prediction, schedules, timesteps, toy
from fullrange.samplers import SAMPLERS, STOCHASTIC

DETERMINISTIC = sorted(set(SAMPLERS) - STOCHASTIC)
SD = schedules.scaled_linear()
ZTSNR = schedules.rescale_zero_terminal_snr(SD)
FLOW = schedules.rectified_flow()
FLOW3 = schedules.rectified_flow(shift=3.0)


def _plans():
    for name, sched in (("sd", SD), ("ztsnr", ZTSNR)):
        for spacing, steps in (
            ("leading", 10),
            ("linspace", 10),
            ("trailing", 7),
            ("trailing", 1),
            ("trailing", 50),
        ):
            offset = 1 if spacing == "leading" else 0
            yield f"{name}-{spacing}-{steps}", sched, timesteps.spaced(1000, steps, spacing, offset)
        yield f"{name}-karras-12", sched, timesteps.ladder(sched, 12, "karras")
    # Rectified flow: continuous t from t = T (SNR = 0), with and without SD3's shift.
    for name, sched in (("flow", FLOW), ("flow-shift3", FLOW3)):
        for steps in (1, 7, 50):
            yield f"{name}-trailing-{steps}", sched, timesteps.plan(sched, steps)
    yield "flow-karras-12", FLOW, timesteps.ladder(FLOW, 12, "karras", num_values=3 * 8 * 8)


PLANS = list(_plans())


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("plan", PLANS, ids=[p[0] for p in PLANS])
def test_oracle_follows_the_forward_process_and_returns_x0(sampler, plan, gen):
    """With a model that knows x0, DDIM-type trajectories are ``a_i x0 + s_i eps`` at every visited step
    and the result is x0: the next point is read from the ladder, not from ``t - T//S``."""
    _, sched, steps = plan
    x0 = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    ac = sched.alphas_cumprod_at(steps)
    x_start = prediction.add_noise(x0, eps, float(ac[0]))
    seen = []

    def check(info):
        seen.append(info.t)
        if sampler not in STOCHASTIC:
            expected = prediction.add_noise(x0, eps, float(ac[info.i]))
            torch.testing.assert_close(info.x, expected, atol=1e-10, rtol=0)

    out = SAMPLERS[sampler](
        lambda x, t, a, **c: x0,
        x_start,
        sched,
        steps,
        callback=check,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)
    assert seen == steps.double().tolist()


EXPECTED_ORDER = {"ddim": 1, "euler": 1, "heun": 2, "dpmpp_2m": 2, "unipc": 3}


@pytest.mark.parametrize("sampler", sorted(EXPECTED_ORDER))
def test_convergence_order_on_gaussian_toy(sampler, report):
    """Error against the exact ODE solution falls as ``S^-p`` (UniPC-2 + corrector: p = 3, Zhao et al.)."""
    data = toy.GaussianToy(mean=0.3, std=0.5)
    x = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for S in (16, 32, 64, 128):
        steps = SD.sigma_to_t(timesteps.exponential_sigmas(0.03, 14.0, S))
        ac = SD.alphas_cumprod_at(steps)
        exact = data.denoise(data.flow(x, float(ac[0]), float(ac[-1])), 0.0, float(ac[-1]))
        errors.append((SAMPLERS[sampler](data.denoise, x, SD, steps) - exact).abs().max().item())
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
    report(
        f"convergence {sampler}: errors {[f'{e:.2e}' for e in errors]}, observed orders {[round(o, 2) for o in orders]}"
    )
    assert abs(orders[-1] - EXPECTED_ORDER[sampler]) < 0.25


@pytest.mark.parametrize("sched", [ZTSNR, FLOW], ids=["ztsnr", "flow"])
@pytest.mark.parametrize(("sampler", "order"), [("ddim", 1), ("heun", 2), ("unipc", 3)])
def test_order_from_zero_snr_on_the_latent_size_ladder(sampler, order, sched, report):
    """From pure noise at the last timestep (t = T-1; T for rectified flow) down the ladder topped by the latent
    size, against the exact flow from SNR = 0: the error still falls as ``S^-p`` (Heun at least 2: its step from
    σ = ∞ is Euler's)."""
    data = toy.GaussianToy(mean=0.3, std=0.5)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for S in (16, 32, 64, 128):
        steps = timesteps.ladder(sched, S, "exponential", num_values=3 * 8 * 8)
        ac_last = float(sched.alphas_cumprod_at(steps[-1:])[0])
        exact = data.denoise(data.flow(x, 0.0, ac_last), 0.0, ac_last)
        errors.append((SAMPLERS[sampler](data.denoise, x, sched, steps) - exact).abs().max().item())
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
    report(
        f"order from SNR = 0 ({sched.coordinates}), {sampler}: errors {[f'{e:.2e}' for e in errors]}, "
        f"orders {[round(o, 2) for o in orders]}"
    )
    if sampler == "heun":
        assert min(orders) > 1.8
    else:
        assert abs(orders[-1] - order) < 0.25


@pytest.mark.parametrize("plan", PLANS, ids=[p[0] for p in PLANS])
def test_ddim_eta0_equals_euler_and_ancestral_forms_agree(plan):
    _, sched, steps = plan
    data = toy.MixtureToy()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(
        SAMPLERS["ddim"](data.denoise, x, sched, steps),
        SAMPLERS["euler"](data.denoise, x, sched, steps),
        atol=1e-10,
        rtol=0,
    )
    for eta in (1.0, 0.5):
        ddim = SAMPLERS["ddim"](data.denoise, x, sched, steps, eta=eta, generator=torch.Generator().manual_seed(5))
        anc = SAMPLERS["euler_ancestral"](
            data.denoise, x, sched, steps, eta=eta, generator=torch.Generator().manual_seed(5)
        )
        torch.testing.assert_close(ddim, anc, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        SAMPLERS["ddpm"](data.denoise, x, sched, steps, generator=torch.Generator().manual_seed(5)),
        SAMPLERS["ddim"](data.denoise, x, sched, steps, eta=1.0, generator=torch.Generator().manual_seed(5)),
    )


def _diffusers_loop(scheduler, data, noise, sched, kind):
    """A plain diffusers loop with the toy denoiser as the network (raw eps or v output)."""
    x = noise
    if isinstance(scheduler, EulerDiscreteScheduler):
        # Same VP start as ours; diffusers' own init_noise_sigma for trailing is σ_max, not sqrt(σ_max² + 1).
        x = noise * (scheduler.sigmas[0].double() ** 2 + 1).sqrt()
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        ac = float(sched.alphas_cumprod_at(float(t)))
        x0 = data.denoise(x_in, float(t), ac)
        out = prediction.to_v(x0, x_in, ac) if kind == "v_prediction" else prediction.to_eps(x0, x_in, ac)
        x = scheduler.step(out, t, x).prev_sample
    return x


REFERENCES = {
    "euler": EulerDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "ddim": DDIMScheduler,
}


@pytest.mark.parametrize("sampler", sorted(REFERENCES))
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_agrees_with_diffusers(sampler, spacing, zero_terminal_snr):
    """Same toy network, spacing and steps. Tolerances: diffusers runs in float32 (1e-5); at zero terminal
    SNR its DPM++/UniPC clamp ᾱ_T to 2^-24 where we step exactly (3e-3); DDIM's ``t - T//S`` arithmetic
    only agrees where T//S is the true gap (leading; trailing with S dividing T)."""
    kind = "v_prediction" if zero_terminal_snr else "epsilon"
    sched = ZTSNR if zero_terminal_snr else SD
    data = toy.MixtureToy()
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tol = 3e-3 if zero_terminal_snr and sampler in ("dpmpp_2m", "unipc") else 2e-5
    for S in (7, 10, 25):
        if sampler == "ddim" and (spacing == "linspace" or (spacing == "trailing" and 1000 % S)):
            continue
        extra = {"clip_sample": False} if sampler == "ddim" else {}
        ref = REFERENCES[sampler](
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type=kind,
            timestep_spacing=spacing,
            steps_offset=int(spacing == "leading"),
            rescale_betas_zero_snr=zero_terminal_snr,
            **extra,
        )
        ref.set_timesteps(S)
        expected = _diffusers_loop(ref, data, noise, sched, kind)
        ours = SAMPLERS[sampler](data.denoise, noise, sched, ref.timesteps.double())
        assert (ours - expected).abs().max().item() < tol, (S, (ours - expected).abs().max().item())


@pytest.mark.parametrize("sampler", sorted(STOCHASTIC))
def test_stochastic_samplers_match_target_variance(sampler, report):
    """From the exact marginal (pure noise at zero terminal SNR) the samples of the Gaussian toy have mean mu
    and the variance of ``E[x0 | x_t]`` at the last step, ``c² · a²c² / (a²c² + s²)``."""
    data = toy.GaussianToy(mean=0.3, std=0.5)
    n = 40_000
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = timesteps.spaced(1000, 1000, "trailing")
    out = SAMPLERS[sampler](data.denoise, x, ZTSNR, steps, generator=torch.Generator().manual_seed(1))
    ac = float(ZTSNR.alphas_cumprod[0])
    target_std = 0.5 * math.sqrt(ac * 0.25 / (ac * 0.25 + 1 - ac))
    se_mean, se_std = target_std / math.sqrt(n), target_std / math.sqrt(2 * n)
    report(f"stochastic {sampler}: mean {out.mean().item():.4f} (0.3), std {out.std().item():.4f} ({target_std:.4f})")
    assert abs(out.mean().item() - 0.3) < 5 * se_mean
    assert abs(out.std().item() - target_std) < 5 * se_std + 0.01 * target_std


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_same_generator_same_output(sampler):
    data = toy.MixtureToy()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = timesteps.spaced(1000, 6, "trailing")

    def run(seed):
        return SAMPLERS[sampler](data.denoise, x, ZTSNR, steps, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(3), run(3), atol=0, rtol=0)
    assert torch.equal(run(3), run(4)) == (sampler not in STOCHASTIC)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 7, 25])
def test_finite_at_zero_terminal_snr(sampler, steps):
    data = toy.MixtureToy()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for sched, plan in (
        (ZTSNR, timesteps.spaced(1000, steps, "trailing")),
        (ZTSNR, timesteps.spaced(1000, steps, "linspace")),
        (FLOW3, timesteps.plan(FLOW3, steps)),
    ):
        out = SAMPLERS[sampler](data.denoise, x, sched, plan, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out).all()


def test_brightness_effect_on_the_mixture_toy(report):
    """The seeds' finding with an exact denoiser at 3×32×32 and 50 steps: the SD schedule with leading steps
    squeezes the spread of per-image brightness; zero terminal SNR with trailing steps restores it."""
    data = toy.MixtureToy()
    shape = (256, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    reference = data.sample(shape, g)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    ratios = {}
    for label, sched, spacing in (
        ("sd+leading", SD, "leading"),
        ("sd+trailing", SD, "trailing"),
        ("ztsnr+trailing", ZTSNR, "trailing"),
    ):
        steps = timesteps.spaced(1000, 50, spacing, steps_offset=int(spacing == "leading"))
        for sampler in ("ddim", "dpmpp_2m"):
            out = SAMPLERS[sampler](data.denoise, noise, sched, steps)
            ratios[f"{label}/{sampler}"] = metrics.spread_ratio(out, reference)
    report(f"brightness spread, samples / data: { {k: round(v, 3) for k, v in ratios.items()} }")
    assert ratios["sd+leading/ddim"] < 0.5 and ratios["sd+leading/dpmpp_2m"] < 0.5
    assert ratios["ztsnr+trailing/ddim"] > 0.9 and abs(ratios["ztsnr+trailing/dpmpp_2m"] - 1) < 0.1


def test_effect_grows_with_resolution(report):
    """Seed 000: the noise's own mean shrinks as 1/sqrt(N), so the leak matters more for larger images."""
    data = toy.MixtureToy()
    steps = timesteps.spaced(1000, 50, "leading", steps_offset=1)
    ratios = []
    for side in (8, 32):
        shape = (128, 3, side, side)
        g = torch.Generator().manual_seed(0)
        reference = data.sample(shape, g)
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        ratios.append(metrics.spread_ratio(SAMPLERS["ddim"](data.denoise, noise, SD, steps), reference))
    report(f"sd+leading spread ratio at 3x8x8 and 3x32x32: {[round(r, 3) for r in ratios]}")
    assert ratios[1] < ratios[0] - 0.2
