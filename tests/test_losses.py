import math

import pytest
import torch

from fullrange import losses, schedules


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


def test_validation_refuses_zero_terminal_snr_with_epsilon():
    z = schedules.rescale_zero_terminal_snr(schedules.scaled_linear())
    with pytest.raises(ValueError, match="zero terminal SNR with epsilon"):
        losses.validate_recipe(z, "epsilon")
    losses.validate_recipe(z, "v_prediction", "trailing")
    losses.validate_recipe(schedules.scaled_linear(), "epsilon", "leading")
    with pytest.warns(UserWarning, match="leading spacing"):
        losses.validate_recipe(z, "v_prediction", "leading")
    with pytest.warns(UserWarning, match="clipping"):
        losses.validate_recipe(z, "v_prediction", "trailing", clip_x0=True)
