import math

import pytest
import torch

import fullrange
from fullrange import losses, models, schedules, toy


def test_min_snr_weights_match_hang_et_al():
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0], dtype=torch.float64)
    g = 5.0
    expected_eps = torch.minimum(snr, torch.tensor(g, dtype=torch.float64)) / snr
    expected_v = torch.minimum(snr, torch.tensor(g, dtype=torch.float64)) / (snr + 1)
    torch.testing.assert_close(losses.min_snr_weight(snr, "epsilon", g), expected_eps)
    torch.testing.assert_close(losses.min_snr_weight(snr, "v_prediction", g), expected_v)
    torch.testing.assert_close(losses.min_snr_weight(snr, "sample", g), snr.clamp(max=g))


def test_min_snr_is_finite_at_zero_snr_and_floor_keeps_the_top_step():
    z = schedules.rescale_zero_terminal_snr(schedules.scaled_linear())
    w_eps = losses.min_snr_weight(z.snr, "epsilon")
    assert torch.isfinite(w_eps).all() and w_eps[-1].item() == 1.0
    w_v = losses.min_snr_weight(z.snr, "v_prediction")
    assert w_v[-1].item() == 0.0
    w_floor = losses.min_snr_weight(z.snr, "v_prediction", floor=0.1)
    assert w_floor[-1].item() == pytest.approx(0.1) and w_floor.min().item() == pytest.approx(0.1)
    above = w_v >= 0.1
    assert above.sum() > 500  # the floor only touches the two ends of the schedule
    torch.testing.assert_close(w_floor[above], w_v[above])


def test_per_sample_mse():
    out = torch.zeros(3, 2, 2)
    target = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 2)
    torch.testing.assert_close(losses.per_sample_mse(out, target), torch.tensor([0.0, 1.0, 4.0]))


def test_sample_timesteps_uniform():
    t = losses.sample_timesteps(100_000, 1000, torch.Generator().manual_seed(0))
    assert t.min() == 0 and t.max() == 999
    assert abs(t.double().mean().item() - 499.5) < 3 * 288.7 / math.sqrt(100_000)


def test_recipes_refuse_unknown_parts():
    with pytest.raises(ValueError, match="unknown recipe 'cosmic'"):
        losses.get_recipe("cosmic")
    with pytest.raises(ValueError, match="unknown noise 'pink'"):
        losses.Recipe("broken", noise="pink")
    with pytest.raises(ValueError, match="unknown weighting 'snr'"):
        losses.Recipe("broken", weighting="snr")


def test_zero_terminal_snr_recipe_is_lin_et_al():
    """The ztsnr recipe samples as Lin et al. prescribe: SD's betas rescaled (ᾱ_T = 0), v, trailing steps."""
    spec = losses.get_recipe("ztsnr").spec
    assert spec.schedule.zero_terminal_snr and spec.prediction == "v_prediction" and spec.spacing == "trailing"
    rescaled = schedules.rescale_zero_terminal_snr(schedules.scaled_linear())
    torch.testing.assert_close(spec.schedule.alphas_cumprod, rescaled.alphas_cumprod, atol=0, rtol=0)


def test_batch_loss_weights_each_sample_and_shards_add_up():
    """Each process's share (rank of world) is its slice of the same draws; weights scale per-sample losses."""
    images, labels = toy.synthetic_images(4, size=8, channels=3, seed=0)
    recipe = losses.get_recipe("baseline")
    model = models.tiny_unet(8, 3, width=8)
    cond = {"class_labels": labels[:4]}

    def loss(**kwargs):
        with torch.no_grad():
            return losses.batch_loss(model, images[:4], cond, recipe, torch.Generator().manual_seed(3), **kwargs).item()

    per_sample = [loss(rank=r, world=4) for r in range(4)]
    assert loss() == pytest.approx(sum(per_sample) / 4, rel=1e-5)
    weighted = loss(weight=torch.tensor([1.0, 0.0, 2.0, 0.0]))
    assert weighted == pytest.approx((per_sample[0] + 2 * per_sample[2]) / 4, rel=1e-5)


def test_flow_min_snr_weight_is_the_x0_weight_in_velocity_units():
    """An error δ in u is an error ``s/(a + s) δ`` in x0; the flow weight times u's MSE must be ``min(SNR, γ)``
    times x0's MSE."""
    ac = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64)
    a, s = ac.sqrt(), (1 - ac).sqrt()
    x0_per_u = (s / (a + s)) ** 2
    snr = ac / (1 - ac)
    expected = snr.clamp(max=5.0) * x0_per_u
    torch.testing.assert_close(losses.min_snr_weight(snr, "flow", 5.0), expected)


def test_flow_timestep_draws_are_sd3s_logit_normal_shifted():
    """``t = T · shift(sigmoid(n))`` with n standard normal: the median is ``T · shift(1/2)``; its logit is normal."""
    for shift in (1.0, 3.0):
        spec = fullrange.SamplingSpec(schedules.rectified_flow(shift), "flow")
        recipe = losses.Recipe("flow", spec, timestep_draw="logit_normal")
        t = losses.draw_timesteps(recipe, 200_000, torch.Generator().manual_seed(0))
        assert t.dtype == torch.float64 and t.min() > 0 and t.max() < 1000
        assert t.median().item() == pytest.approx(1000 * shift / (1 + shift), rel=0.01)
        tau = t / 1000
        unshifted = tau / (shift - (shift - 1) * tau)  # the inverse of k u / (1 + (k - 1) u)
        logit = torch.logit(unshifted)
        assert abs(logit.mean().item()) < 0.01 and logit.std().item() == pytest.approx(1.0, abs=0.01)
    uniform = losses.Recipe("flow", fullrange.SamplingSpec(schedules.rectified_flow(), "flow"))
    t = losses.draw_timesteps(uniform, 200_000, torch.Generator().manual_seed(1))
    assert t.mean().item() == pytest.approx(500, abs=2) and t.dtype == torch.float64
    with pytest.raises(ValueError, match="unknown timestep_draw 'beta'"):
        losses.Recipe("broken", timestep_draw="beta")


def test_flow_batch_loss_feeds_the_interpolant_and_learns_the_velocity():
    """A network that sees the flow interpolant ``(1 - tau) x0 + tau eps`` and t = T tau, and answers with the exact
    ``eps - x0`` it can recover from them (it is told x0), has zero loss; one a flow sign off does not."""
    recipe = losses.get_recipe("flow")
    x0 = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def oracle(x, t, sign=1.0):
        tau = (t.double() / 1000).view(-1, 1, 1, 1)
        eps = (x.double() - (1 - tau) * x0.double()) / tau  # invert the interpolant
        return (sign * (eps - x0.double())).float()

    loss = losses.batch_loss(oracle, x0, {}, recipe, torch.Generator().manual_seed(3))
    assert loss.item() < 1e-8
    wrong = losses.batch_loss(lambda x, t: oracle(x, t, -1.0), x0, {}, recipe, torch.Generator().manual_seed(3))
    assert wrong.item() > 0.5
