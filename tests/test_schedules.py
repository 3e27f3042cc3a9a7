import math

import pytest
import torch
from diffusers import DDIMScheduler

from fullrange import schedules

DIFFUSERS_KW = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
}


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_alphas_cumprod_match_diffusers(name, zero_terminal_snr):
    ours = schedules.by_name(name, zero_terminal_snr=zero_terminal_snr).alphas_cumprod
    ref = DDIMScheduler(**DIFFUSERS_KW[name], rescale_betas_zero_snr=zero_terminal_snr).alphas_cumprod.double()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_reference_numbers():
    sd = schedules.scaled_linear()
    assert sd.alphas_cumprod[-1].sqrt().item() == pytest.approx(0.068265, abs=5e-7)
    assert sd.alphas_cumprod[-1].item() == pytest.approx(0.0046601, abs=5e-8)
    assert sd.snr[-1].item() == pytest.approx(0.0046819, abs=5e-8)
    assert sd.snr[0].item() == pytest.approx(1175.47, abs=0.01)
    lin = schedules.linear()
    assert lin.alphas_cumprod[-1].sqrt().item() == pytest.approx(0.0063528, abs=5e-8)
    assert lin.snr[-1].item() == pytest.approx(4.036e-5, rel=1e-3)


def test_rescale_zero_terminal_snr_reference():
    sd = schedules.scaled_linear()
    z = schedules.rescale_zero_terminal_snr(sd)
    assert z.alphas_cumprod[-1].item() == 0.0
    assert z.zero_terminal_snr and not sd.zero_terminal_snr
    assert z.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=5e-6)
    assert z.alphas_cumprod[0].item() == pytest.approx(sd.alphas_cumprod[0].item(), abs=1e-15)
    assert z.alphas_cumprod[500].item() == pytest.approx(0.24102, abs=5e-6)
    assert sd.alphas_cumprod[500].item() == pytest.approx(0.27633, abs=5e-6)
    # sqrt(ᾱ) is an affine map of the original (Algorithm 1).
    root, root_z = sd.alphas_cumprod.sqrt(), z.alphas_cumprod.sqrt()
    slope = (root_z[0] - root_z[-1]) / (root[0] - root[-1])
    torch.testing.assert_close(root_z, (root - root[-1]) * slope)
    assert math.isinf(z.sigmas[-1].item()) and z.snr[-1].item() == 0.0


def test_cosine_clipping():
    clipped, free = schedules.cosine(clip=True), schedules.cosine(clip=False)
    assert clipped.betas.max().item() == pytest.approx(0.999)
    assert clipped.alphas_cumprod[-1].item() > 0
    assert free.alphas_cumprod[-1].item() == 0.0
    torch.testing.assert_close(free.alphas_cumprod[:-1], clipped.alphas_cumprod[:-1])
    # ᾱ(t) = f(t)/f(0) at t = (i + 1)/T.
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert free.alphas_cumprod[499].item() == pytest.approx(f(0.5) / f(0.0), rel=1e-12)


def test_views_and_betas_round_trip():
    s = schedules.scaled_linear()
    torch.testing.assert_close(schedules.from_betas(s.betas).alphas_cumprod, s.alphas_cumprod)
    torch.testing.assert_close(s.sigmas, ((1 - s.alphas_cumprod) / s.alphas_cumprod).sqrt())
    torch.testing.assert_close(s.log_snr.exp(), s.snr)


def test_fractional_timesteps_and_sigma_inverse():
    s = schedules.scaled_linear()
    t = torch.tensor([0.0, 10.0, 500.0, 999.0])
    torch.testing.assert_close(s.alphas_cumprod_at(t), s.alphas_cumprod[t.long()])
    half = s.alphas_cumprod_at(torch.tensor([10.5]))
    expected = torch.sigmoid((s.log_snr[10] + s.log_snr[11]) / 2)
    torch.testing.assert_close(half, expected.reshape(1))
    t_back = s.sigma_to_t(s.sigmas[[3, 250, 998]])
    torch.testing.assert_close(t_back, torch.tensor([3.0, 250.0, 998.0], dtype=torch.float64))
    frac = torch.tensor(123.25, dtype=torch.float64)
    sigma = ((1 - s.alphas_cumprod_at(frac)) / s.alphas_cumprod_at(frac)).sqrt()
    assert s.sigma_to_t(sigma).item() == pytest.approx(123.25, abs=1e-9)


def test_zero_terminal_snr_at_is_finite():
    z = schedules.rescale_zero_terminal_snr(schedules.scaled_linear())
    assert z.alphas_cumprod_at(999.0).item() == 0.0
    assert torch.isfinite(z.alphas_cumprod_at(torch.tensor([998.0, 999.0]))).all()


def test_resolution_shift():
    s = schedules.scaled_linear()
    shifted = schedules.shift_resolution(s, base=64, resolution=128)
    torch.testing.assert_close(shifted.snr, s.snr * (64 / 128) ** 2)
    z = schedules.rescale_zero_terminal_snr(s)
    assert schedules.shift_resolution(z, 64, 128).alphas_cumprod[-1].item() == 0.0


def test_schedule_is_immutable_and_validated():
    s = schedules.scaled_linear()
    with pytest.raises(AttributeError):
        s.alphas_cumprod = torch.zeros(3)
    with pytest.raises(ValueError, match="non-increasing"):
        schedules.Schedule(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        schedules.Schedule(torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="only the last"):
        schedules.Schedule(torch.tensor([0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'"):
        schedules.by_name("quadratic")


def test_rectified_flow_is_a_vp_point_with_the_issue_mapping():
    """``sqrt(ᾱ) = (1 - tau) / sqrt((1 - tau)² + tau²)`` at continuous t = T tau, exact between the table's entries,
    SNR = 0 at t = T, and k-diffusion's sigma = tau / (1 - tau) (so ``sigma_to_t`` inverts it)."""
    flow = schedules.rectified_flow()
    t = torch.tensor([0.0, 0.5, 1.0, 333.3, 999.9, 1000.0], dtype=torch.float64)
    tau = t / 1000
    expected = (1 - tau) / ((1 - tau) ** 2 + tau**2).sqrt()
    torch.testing.assert_close(flow.alphas_cumprod_at(t).sqrt(), expected, rtol=1e-14, atol=1e-15)
    assert flow.zero_terminal_snr and float(flow.alphas_cumprod_at(1000.0)) == 0.0
    torch.testing.assert_close(flow.alphas_cumprod, flow.alphas_cumprod_at(flow.timesteps), rtol=0, atol=0)
    sigma = tau[1:-1] / (1 - tau[1:-1])
    torch.testing.assert_close(flow.sigma_to_t(sigma), t[1:-1], rtol=1e-12, atol=1e-9)
    assert float(flow.sigma_to_t(math.inf)) == 1000.0
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        flow.alphas_cumprod_at(1000.5)


def test_shift_is_sigma_times_k():
    """SD3's shift ``k tau / (1 + (k - 1) tau)`` multiplies k-diffusion's sigma by k, exactly; Flux's exponential
    shift by mu (diffusers' ``time_shift``) is the shift with ``k = exp(mu)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tau = torch.linspace(0.001, 0.999, 57, dtype=torch.float64)
    for k in (0.5, 1.0, 3.0, 6.2):
        shifted = schedules.shift_time(tau, k)
        torch.testing.assert_close(shifted / (1 - shifted), k * tau / (1 - tau), rtol=1e-12, atol=0)
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    for mu in (0.5, 0.8, 1.15):
        torch.testing.assert_close(schedules.shift_time(tau, math.exp(mu)), ref.time_shift(mu, 1.0, tau))
    linear = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    torch.testing.assert_close(schedules.shift_time(tau, 2.5), linear.time_shift(2.5, 1.0, tau))


def test_flux_mu_matches_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq_len in (16, 256, 1024, 4096, 6000):
        assert schedules.flux_mu(seq_len) == pytest.approx(calculate_shift(seq_len), rel=1e-12)
        assert schedules.flux_shift(seq_len) == pytest.approx(math.exp(calculate_shift(seq_len)), rel=1e-12)


def test_resolution_rule_is_hoogeboom_shift_and_the_ladder_top():
    """One fact in three forms: SD3's ``k = sqrt(m / n)`` is the ratio of :func:`resolution_sigma_max` at the two
    sizes, and Hoogeboom's VP shift from side b to side d multiplies every sigma by ``d / b``, the same k."""
    from fullrange.timesteps import resolution_sigma_max

    m, n = 16 * 128 * 128, 16 * 32 * 32
    k = schedules.resolution_shift(m, n)
    assert k == pytest.approx(4.0, rel=1e-15)
    assert k == pytest.approx(resolution_sigma_max(m) / resolution_sigma_max(n), rel=1e-15)
    sd = schedules.scaled_linear()
    shifted = schedules.shift_resolution(sd, 32, 128)
    torch.testing.assert_close(shifted.sigmas, k * sd.sigmas, rtol=1e-9, atol=0)
    assert schedules.resolution_shift(m, n, base_shift=3.0) == pytest.approx(12.0)
    with pytest.raises(ValueError, match="shift must be a positive number"):
        schedules.rectified_flow(shift=0)


def test_with_shift_keeps_alphas_cumprod_and_names_the_shift():
    base = schedules.rectified_flow()
    three = schedules.with_shift(base, 3.0)
    assert three.shift == 3.0 and base.shift == 1.0
    assert torch.equal(three.alphas_cumprod, base.alphas_cumprod)
    assert schedules.from_origin(three.origin).shift == 3.0
