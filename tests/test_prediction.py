import pytest
import torch

from fullrange import prediction


def _draw(gen, n=64):
    x0 = torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64)
    ac = torch.rand(n, generator=gen, dtype=torch.float64)
    ac[0], ac[1] = 0.0, 1e-12  # SNR = 0 and nearly so
    return x0, eps, ac


@pytest.mark.parametrize("kind", ["v_prediction", "sample", "flow"])
def test_round_trip_including_zero_snr(gen, kind):
    x0, eps, ac = _draw(gen)
    x_t = prediction.add_noise(x0, eps, ac)
    target = prediction.training_target(kind, x0, eps, ac)
    torch.testing.assert_close(prediction.to_x0(kind, target, x_t, ac), x0)


def test_epsilon_round_trip_where_defined(gen):
    x0, eps, ac = _draw(gen)
    ac = ac.clamp(min=1e-3)
    x_t = prediction.add_noise(x0, eps, ac)
    torch.testing.assert_close(prediction.to_x0("epsilon", eps, x_t, ac), x0)


def test_epsilon_is_refused_at_zero_snr(gen):
    x0, eps, ac = _draw(gen)
    x_t = prediction.add_noise(x0, eps, ac)
    with pytest.raises(ValueError, match="zero SNR"):
        prediction.to_x0("epsilon", eps, x_t, ac)


def test_v_formulas(gen):
    """Salimans & Ho: v = a eps - s x0, x0 = a x_t - s v, eps = s x_t + a v."""
    x0, eps, ac = _draw(gen)
    a, s = ac.sqrt().view(-1, 1, 1, 1), (1 - ac).sqrt().view(-1, 1, 1, 1)
    x_t = prediction.add_noise(x0, eps, ac)
    v = prediction.training_target("v_prediction", x0, eps, ac)
    torch.testing.assert_close(v, a * eps - s * x0)
    torch.testing.assert_close(s * x_t + a * v, eps)
    torch.testing.assert_close(prediction.to_v(x0, x_t, ac), v)
    torch.testing.assert_close(prediction.to_eps(x0, x_t, ac), eps)
    torch.testing.assert_close(prediction.from_v(v, x_t, ac), x0)


def test_scalar_alpha_and_dtype(gen):
    x0 = torch.randn(2, 3, generator=gen)
    eps = torch.randn(2, 3, generator=gen)
    x_t = prediction.add_noise(x0, eps, 0.25)
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(x_t, 0.5 * x0 + 0.75**0.5 * eps)


def test_unknown_prediction():
    with pytest.raises(ValueError, match="unknown prediction type 'flow_matching'"):
        prediction.training_target("flow_matching", torch.zeros(1), torch.zeros(1), 0.5)


def test_flow_formulas_in_flow_coordinates(gen):
    """Rectified flow: the network sees ``x = (1 - tau) x0 + tau eps`` and predicts ``u = eps - x0``; written in
    flow coordinates, ``x0 = x - tau u``. The VP maps must agree with these at every tau, SNR = 0 (tau = 1) included."""
    x0, eps, _ = _draw(gen)
    tau = torch.rand(x0.shape[0], generator=gen, dtype=torch.float64)
    tau[0] = 1.0
    ac = (1 - tau) ** 2 / ((1 - tau) ** 2 + tau**2)
    t4 = tau.view(-1, 1, 1, 1)
    x_flow = (1 - t4) * x0 + t4 * eps
    x_t = prediction.add_noise(x0, eps, ac)
    torch.testing.assert_close(prediction.to_flow_input(x_t, ac), x_flow)
    torch.testing.assert_close(prediction.from_flow_input(x_flow, ac), x_t)
    torch.testing.assert_close(prediction.model_input("flow", x_t, ac), x_flow)
    assert prediction.model_input("vp", x_t, ac) is x_t
    u = prediction.training_target("flow", x0, eps, ac)
    torch.testing.assert_close(u, eps - x0)
    torch.testing.assert_close(x_flow - t4 * u, x0)
    torch.testing.assert_close(prediction.to_x0("flow", u, x_t, ac), x0)
    torch.testing.assert_close(prediction.from_x0("flow", x0, x_t, ac), u)
