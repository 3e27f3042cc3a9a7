import pytest
import torch
from diffusers.guiders.guider_utils import rescale_noise_cfg

from fullrange import guidance, prediction


def _conditional_denoiser():
    """x0 depends on a per-sample ``scale`` tensor, so cond and uncond branches differ."""

    def denoise(x, t, ac, *, scale):
        return 0.5 * x * scale.view(-1, 1, 1, 1) + scale.view(-1, 1, 1, 1) ** 2

    return denoise


def _inputs(gen):
    x = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    return (
        x,
        {"scale": torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)},
        {"scale": torch.zeros(3, dtype=torch.float64)},
    )


@pytest.mark.parametrize("ac", [0.0, 0.3])
def test_plain_guidance_is_the_same_in_every_space(gen, ac):
    x, cond, uncond = _inputs(gen)
    base = _conditional_denoiser()
    pos, neg = base(x, 0, ac, **cond), base(x, 0, ac, **uncond)
    for space in guidance.RESCALE_SPACES:
        out = guidance.cfg(base, 7.5, uncond, 0.0, space)(x, 0, ac, **cond)
        torch.testing.assert_close(out, neg + 7.5 * (pos - neg))
    torch.testing.assert_close(guidance.cfg(base, 1.0, uncond)(x, 0, ac, **cond), pos)


@pytest.mark.parametrize("ac", [0.0, 0.3])
def test_rescale_in_v_space_matches_lin_et_al_and_diffusers(gen, ac):
    """Eq. 14-16 on the v output (what diffusers' rescale_noise_cfg computes for a v model)."""
    x, cond, uncond = _inputs(gen)
    base = _conditional_denoiser()
    v_pos = prediction.to_v(base(x, 0, ac, **cond), x, ac)
    v_neg = prediction.to_v(base(x, 0, ac, **uncond), x, ac)
    v_cfg = v_neg + 7.5 * (v_pos - v_neg)
    expected_v = rescale_noise_cfg(v_cfg, v_pos, guidance_rescale=0.7)
    out = guidance.cfg(base, 7.5, uncond, 0.7, "v")(x, 0, ac, **cond)
    torch.testing.assert_close(prediction.to_v(out, x, ac), expected_v)
    # φ = 1 restores the positive branch's std per sample exactly.
    full = prediction.to_v(guidance.cfg(base, 7.5, uncond, 1.0, "v")(x, 0, ac, **cond), x, ac)
    torch.testing.assert_close(full.flatten(1).std(1), v_pos.flatten(1).std(1))


def test_rescale_space_changes_the_result(gen):
    x, cond, uncond = _inputs(gen)
    base = _conditional_denoiser()
    in_v = guidance.cfg(base, 7.5, uncond, 0.7, "v")(x, 0, 0.3, **cond)
    in_x0 = guidance.cfg(base, 7.5, uncond, 0.7, "x0")(x, 0, 0.3, **cond)
    assert (in_v - in_x0).abs().max() > 1e-3


def test_zero_std_is_guarded():
    flat = lambda x, t, ac, *, c: torch.zeros_like(x) + c.view(-1, 1, 1, 1)  # noqa: E731
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    out = guidance.cfg(flat, 5.0, {"c": torch.zeros(2, dtype=torch.float64)}, 0.7, "x0")(
        x, 0, 0.5, c=torch.ones(2, dtype=torch.float64)
    )
    torch.testing.assert_close(out, torch.full_like(x, 5.0))


def test_bad_guidance_options():
    with pytest.raises(ValueError, match="rescale space 'eps'"):
        guidance.cfg(lambda *a, **k: None, 7.5, {}, 0.7, "eps")
    with pytest.raises(ValueError, match=r"guidance_rescale must lie in \[0, 1\]"):
        guidance.cfg(lambda *a, **k: None, 7.5, {}, 1.5)
    guided = guidance.cfg(_conditional_denoiser(), 7.5, {"other": torch.zeros(1)})
    with pytest.raises(ValueError, match="different keys"):
        guided(torch.zeros(1, 1, 1, 1), 0, 0.5, scale=torch.ones(1))
