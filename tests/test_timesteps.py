import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from fullrange import schedules, timesteps

# Lin et al. 2024, Table 2 (T = 1000, S = 10), 0-indexed as diffusers prints them.
TABLE_2 = {
    "leading": [901, 801, 701, 601, 501, 401, 301, 201, 101, 1],
    "linspace": [999, 888, 777, 666, 555, 444, 333, 222, 111, 0],
    "trailing": [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
}


@pytest.mark.parametrize("spacing", list(TABLE_2))
def test_table_2(spacing):
    offset = 1 if spacing == "leading" else 0
    assert timesteps.spaced(1000, 10, spacing, steps_offset=offset).tolist() == TABLE_2[spacing]


@pytest.mark.parametrize("T,S", [(1000, 7), (1000, 25), (1000, 50), (1000, 1000), (1000, 3), (500, 33), (37, 5)])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_spacing_matches_diffusers(T, S, spacing):
    # DDIM rounds linspace; DPM-Solver's leading/trailing formulas differ, so DDIM is the reference.
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    ref.set_timesteps(S)
    ours = timesteps.spaced(T, S, spacing)
    assert ours.dtype == torch.int64
    assert ours.tolist() == ref.timesteps.tolist()
    assert (ours[1:] < ours[:-1]).all()


@pytest.mark.parametrize("S", [7, 10, 25])
def test_trailing_matches_dpm_solver(S):
    ref = DPMSolverMultistepScheduler(timestep_spacing="trailing")
    ref.set_timesteps(S)
    assert timesteps.spaced(1000, S, "trailing").tolist() == ref.timesteps.tolist()


def test_only_linspace_and_trailing_reach_the_last_timestep():
    for S in (5, 7, 10, 50):
        assert timesteps.spaced(1000, S, "trailing")[0] == 999
        assert timesteps.spaced(1000, S, "linspace")[0] == 999
        assert timesteps.spaced(1000, S, "leading", steps_offset=1)[0] < 999


def test_karras_and_exponential_sigmas():
    k = timesteps.karras_sigmas(0.03, 14.6, 10, rho=7.0)
    assert k[0].item() == pytest.approx(14.6) and k[-1].item() == pytest.approx(0.03)
    roots = k ** (1 / 7)
    torch.testing.assert_close(roots.diff(), roots.diff()[:1].expand(9))
    e = timesteps.exponential_sigmas(0.03, 14.6, 10)
    torch.testing.assert_close(e.log().diff(), e.log().diff()[:1].expand(9))


def test_ladder_matches_diffusers_karras_timesteps():
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True
    )
    ref.set_timesteps(20)
    ours = timesteps.ladder(schedules.scaled_linear(), 20, "karras")
    np.testing.assert_allclose(ours.numpy(), ref.timesteps.numpy(), atol=2e-3)


def test_ztsnr_ladder_is_sensible(report):
    z = schedules.rescale_zero_terminal_snr(schedules.scaled_linear())
    t = timesteps.ladder(z, 25, "karras")
    assert t[0].item() == 999.0
    assert (t[1:] < t[:-1]).all()
    report(f"karras ladder at zero terminal SNR, 25 steps: {[round(v, 1) for v in t.tolist()]}")
    # One step at σ = ∞, then σ_max = ZTSNR_SIGMA_MAX (diffusers' Euler spends 18 of 25 at t >= 997).
    assert int((t >= 990).sum()) == 1
    assert z.sigmas[int(t[1].round())].item() == pytest.approx(timesteps.ZTSNR_SIGMA_MAX, rel=0.05)
    # Below the first step it is the usual Karras ladder: most steps in the lower part of the range.
    assert t.median().item() < 800


@pytest.mark.parametrize(
    "args,match",
    [
        ((1000, 0, "trailing"), "steps must be between"),
        ((1000, 1001, "trailing"), "steps must be between"),
        ((1000, 10, "uniform"), "unknown spacing 'uniform'"),
    ],
)
def test_bad_spacing_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        timesteps.spaced(*args)


def test_bad_ladder_arguments():
    with pytest.raises(ValueError, match="unknown ladder"):
        timesteps.ladder(schedules.scaled_linear(), 10, "polyexponential")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        timesteps.karras_sigmas(1.0, 0.5, 10)


def test_plan_dispatches_and_offsets_leading_only():
    sd = schedules.scaled_linear()
    assert timesteps.plan(sd, 10, "leading", steps_offset=1).tolist() == TABLE_2["leading"]
    assert timesteps.plan(sd, 10, "trailing", steps_offset=1).tolist() == TABLE_2["trailing"]
    assert timesteps.plan(sd, 10, "linspace", steps_offset=1).tolist() == TABLE_2["linspace"]
    torch.testing.assert_close(timesteps.plan(sd, 12, "karras"), timesteps.ladder(sd, 12, "karras"))


@pytest.mark.parametrize("shape", [(3, 32, 32), (4, 64, 64), (4, 128, 128)])
def test_ladder_topped_by_the_latent_size(shape):
    """At zero terminal SNR: t = T-1 first, then σ = 2 sqrt(C·H·W) (the image mean's SNR, D·SNR, is 1/4 there),
    then the Karras or exponential ladder down to σ(0), strictly descending."""
    z = schedules.rescale_zero_terminal_snr(schedules.scaled_linear())
    D = math.prod(shape)
    assert timesteps.resolution_sigma_max(D) == pytest.approx(2 * math.sqrt(D))
    for kind in ("karras", "exponential"):
        for n in (2, 6, 25):
            t = timesteps.ladder(z, n, kind, num_values=D)
            assert len(t) == n and t[0].item() == 999.0 and bool((t[1:] < t[:-1]).all())
            sigmas = z.alphas_cumprod_at(t[1:]).pow(-1).sub(1).sqrt()
            assert sigmas[-1].item() == pytest.approx(z.sigmas[0].item(), rel=1e-6)  # one finite step: σ(0)
            if n > 2:
                assert sigmas[0].item() == pytest.approx(2 * math.sqrt(D), rel=1e-6)
                assert D / sigmas[0].item() ** 2 == pytest.approx(0.25, rel=1e-6)
    # The bigger the latent, the more of the ladder sits where the mean is decided (σ > sqrt(D) / 2).
    assert timesteps.ladder(z, 10, num_values=4 * 128 * 128)[1] > timesteps.ladder(z, 10, num_values=3 * 32 * 32)[1]


def test_latent_size_leaves_schedules_without_zero_terminal_snr_alone():
    sd = schedules.scaled_linear()
    torch.testing.assert_close(timesteps.ladder(sd, 10, num_values=16384), timesteps.ladder(sd, 10))
    with pytest.raises(ValueError, match="num_values must be positive"):
        timesteps.resolution_sigma_max(0)


def test_describe_plan_is_the_plan_with_its_snr_and_mean_leak():
    """Each row is the plan's step with ᾱ from the schedule, SNR = ᾱ/(1-ᾱ), σ = SNR^-1/2 (None at SNR = 0) and
    the mean leak √(SNR·N)."""
    import math

    sd, z = schedules.scaled_linear(), schedules.rescale_zero_terminal_snr(schedules.scaled_linear())
    rows = timesteps.describe_plan(sd, 10, "leading", 1, 4 * 64 * 64)
    assert [r["t"] for r in rows] == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    ac = float(sd.alphas_cumprod[901])
    assert rows[0]["alphas_cumprod"] == pytest.approx(ac, rel=1e-12)
    assert rows[0]["snr"] == pytest.approx(ac / (1 - ac), rel=1e-12)
    assert rows[0]["sigma"] == pytest.approx(math.sqrt((1 - ac) / ac), rel=1e-12)
    assert rows[0]["mean_leak"] == pytest.approx(math.sqrt(ac / (1 - ac) * 4 * 64 * 64), rel=1e-12)
    top = timesteps.describe_plan(z, 12, "karras", num_values=4 * 64 * 64)
    assert top[0]["t"] == 999 and top[0]["sigma"] is None and top[0]["mean_leak"] == 0.0
    assert top[1]["sigma"] == pytest.approx(timesteps.resolution_sigma_max(4 * 64 * 64), rel=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_steps_match_flow_match_euler(shift):
    """Trailing steps on rectified flow are diffusers' FlowMatchEulerDiscreteScheduler with Flux's sigmas
    ``linspace(1, 1/S, S)``, shifted; a σ ladder starts at t = T."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = schedules.rectified_flow(shift)
    for S in (1, 4, 28):
        ref = FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / S, S).tolist())
        ours = timesteps.plan(flow, S)
        torch.testing.assert_close(ours, ref.timesteps.double(), rtol=2e-7, atol=1e-4)
        assert float(ours[0]) == 1000.0
    lad = timesteps.plan(flow, 6, "karras", num_values=4 * 64 * 64)
    assert float(lad[0]) == 1000.0
    torch.testing.assert_close(flow.sigma_to_t(timesteps.resolution_sigma_max(4 * 64 * 64)), lad[1])
    with pytest.raises(ValueError, match="trailing steps or a σ ladder"):
        timesteps.plan(flow, 6, "leading")
