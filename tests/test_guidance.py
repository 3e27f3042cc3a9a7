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


def _branches(gen, n=3):
    return [torch.randn(n, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(2)]


def test_every_shaping_at_its_neutral_setting_is_plain_cfg(gen):
    negative, positive = _branches(gen)
    neutral = guidance.Shaping(momentum=0.0, norm_threshold=0.0, eta=1.0, low_scale=7.5)
    plain = negative + 7.5 * (positive - negative)
    torch.testing.assert_close(guidance.combine(negative, positive, 7.5, neutral, {}), plain)


def test_apg_equals_diffusers_normalized_guidance_over_steps_with_momentum(gen):
    """Sadat et al.: momentum, norm threshold, the parallel part weighed by eta; diffusers' AdaptiveProjectedGuidance
    computes it with ``normalized_guidance`` on the same two branches."""
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    shaping = guidance.Shaping(momentum=-0.5, norm_threshold=5.0, eta=0.0)
    buffer, state = MomentumBuffer(-0.5), {}
    for _ in range(3):
        negative, positive = _branches(gen)
        theirs = normalized_guidance(positive, negative, 7.5, buffer, eta=0.0, norm_threshold=5.0)
        torch.testing.assert_close(guidance.combine(negative, positive, 7.5, shaping, state), theirs)


def test_apg_with_eta_zero_keeps_no_part_parallel_to_the_positive_branch(gen):
    negative, positive = _branches(gen)
    out = guidance.combine(negative, positive, 7.5, guidance.Shaping(eta=0.0), {})
    along = ((out - negative) * positive).flatten(1).sum(1)
    assert along.abs().max().item() < 1e-9
    assert not torch.allclose(out, negative + 7.5 * (positive - negative))


def test_cfg_zero_star_equals_diffusers(gen):
    """Fan et al. 2025: the negative branch scaled by <x_pos, x_neg> / ||x_neg||² per sample (diffusers'
    ClassifierFreeZeroStarGuidance after its zero-init steps)."""
    from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale

    negative, positive = _branches(gen)
    alpha = cfg_zero_star_scale(positive.flatten(1), negative.flatten(1)).view(-1, 1, 1, 1)
    theirs = negative * alpha + 7.5 * (positive - negative * alpha)
    out = guidance.combine(negative, positive, 7.5, guidance.Shaping(zero_star=True), {})
    torch.testing.assert_close(out, theirs)
    # The scale is the least-squares fit: the fitted negative is closer to the positive than the raw one.
    fitted = negative * alpha
    assert ((positive - fitted) ** 2).sum() < ((positive - negative) ** 2).sum()


def test_frequency_decoupled_guidance_moves_only_the_low_band_to_its_scale(gen):
    """With the low band's scale 1, the output's lowest 3×3 DCT frequencies are the positive branch's (no guidance
    there, so no brightness shift from it), and the rest is plain CFG's."""
    from fullrange.leak import from_low_frequencies, low_frequencies

    negative, positive = _branches(gen)

    def low(x):
        return from_low_frequencies(low_frequencies(x, 3), (8, 8))

    out = guidance.combine(negative, positive, 7.5, guidance.Shaping(low_scale=1.0), {})
    plain = negative + 7.5 * (positive - negative)
    torch.testing.assert_close(low(out), low(positive))
    torch.testing.assert_close(out - low(out), plain - low(plain))


def test_guidance_interval_skips_the_negative_branch_outside_it(gen):
    """Kynkäänniemi et al.: no guidance outside (lo, hi] in σ; there the model runs on the positive branch alone.
    At zero terminal SNR (σ = ∞) a finite interval never guides the first step."""
    x, cond, uncond = _inputs(gen)
    calls = []

    def counted(x, t, ac, **kw):
        calls.append(x.shape[0])
        return _conditional_denoiser()(x, t, ac, **kw)

    shaping = guidance.Shaping(interval=(0.3, 5.0))
    guided = guidance.cfg(counted, 7.5, uncond, shaping=shaping, space="x0")
    inside = 1 / (1 + 1.0**2)  # σ = 1
    for ac, guides in ((0.0, False), (1 / (1 + 10.0**2), False), (inside, True), (1 / (1 + 0.1**2), False)):
        calls.clear()
        out = guided(x, 0, ac, **cond)
        plain = guidance.cfg(_conditional_denoiser(), 7.5, uncond, space="x0")(x, 0, ac, **cond)
        if guides:
            assert calls == [6] and torch.allclose(out, plain)
        else:
            assert calls == [3] and torch.equal(out, _conditional_denoiser()(x, 0, ac, **cond))
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        guidance.Shaping(interval=(2.0, 1.0))


def test_sample_takes_a_shaping(gen):
    """Through ``fullrange.sample``: an interval that holds no step of the run is sampling without guidance."""
    from fullrange import SamplingSpec, sample, schedules

    spec = SamplingSpec(schedules.rescale_zero_terminal_snr(schedules.scaled_linear()), "v_prediction")
    noise = torch.randn(2, 4, 8, 8, generator=gen)

    def model(x, t, scale):
        return 0.1 * x * scale.view(-1, 1, 1, 1) + scale.view(-1, 1, 1, 1)

    cond, uncond = {"scale": torch.tensor([1.0, 2.0])}, {"scale": torch.zeros(2)}
    kwargs = {"sampler": "ddim", "steps": 6, "cond": cond, "uncond": uncond}
    unguided = sample(model, noise, spec, guidance_scale=1.0, **kwargs)
    never = guidance.Shaping(interval=(1e6, 1e7))
    torch.testing.assert_close(sample(model, noise, spec, guidance_scale=7.5, shaping=never, **kwargs), unguided)
    assert not torch.allclose(sample(model, noise, spec, guidance_scale=7.5, **kwargs), unguided)


def _two_branch_model(x, t, scale):
    return 0.1 * x * scale.view(-1, 1, 1, 1) + scale.view(-1, 1, 1, 1)


@pytest.mark.parametrize("zero_snr", [False, True])
def test_cfg_pp_is_the_papers_ddim_step(gen, zero_snr):
    """CFG++ (Chung et al., ICLR 2025, Algorithm 1), written out: ``x' = a' x0_λ + s' eps_∅`` with the unconditional
    eps, and the guided x0 at the last step; fullrange applies it as per-step CFG scales. Euler is the same step."""
    from fullrange import SamplingSpec, sample, schedules
    from fullrange.sampling import STABLE_DIFFUSION

    spec = (
        SamplingSpec(schedules.rescale_zero_terminal_snr(schedules.scaled_linear()), "v_prediction")
        if zero_snr
        else STABLE_DIFFUSION
    )
    noise = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    cond, uncond = {"scale": torch.tensor([1.0, 2.0])}, {"scale": torch.zeros(2)}
    lam, steps = 0.6, spec.plan(6)
    x = noise
    for i, t in enumerate(steps.tolist()):
        ac = float(spec.schedule.alphas_cumprod_at(torch.tensor([t], dtype=torch.float64))[0])
        tt = torch.full((2,), t)
        x0_c = prediction.to_x0(spec.prediction, _two_branch_model(x, tt, **cond).double(), x, ac)
        x0_u = prediction.to_x0(spec.prediction, _two_branch_model(x, tt, **uncond).double(), x, ac)
        x0_lam = x0_u + lam * (x0_c - x0_u)
        if i == len(steps) - 1:
            break
        nxt = float(spec.schedule.alphas_cumprod_at(torch.tensor([steps[i + 1].item()], dtype=torch.float64))[0])
        eps_u = (x - ac**0.5 * x0_u) / (1 - ac) ** 0.5
        x = nxt**0.5 * x0_lam + (1 - nxt) ** 0.5 * eps_u
    shaping = guidance.Shaping(cfg_pp=True)
    kwargs = {"steps": 6, "cond": cond, "uncond": uncond, "guidance_scale": lam, "shaping": shaping}
    for sampler in ("ddim", "euler"):
        out = sample(_two_branch_model, noise, spec, sampler=sampler, spacing=spec.spacing, **kwargs)
        torch.testing.assert_close(out, x0_lam, rtol=1e-9, atol=1e-9)
    plain = sample(_two_branch_model, noise, spec, sampler="ddim", spacing=spec.spacing, **kwargs | {"shaping": None})
    assert not torch.allclose(plain, x0_lam)


def test_cfg_pp_scales_and_refusals(gen):
    """λ at σ = ∞ and at the last step, λ σ / (σ - σ') between; samplers it is not defined for are refused."""
    from fullrange import sample
    from fullrange.sampling import ZERO_TERMINAL_SNR

    scales = guidance.cfg_pp_scales(0.5, [999.0, 500.0, 10.0], [float("inf"), 4.0, 1.0, 0.0])
    assert scales == {999.0: 0.5, 500.0: 0.5 * 4 / 3, 10.0: 0.5}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        guidance.cfg_pp_scales(2.0, [1.0], [1.0, 0.0])
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    kwargs = {"steps": 4, "cond": {"scale": torch.ones(2)}, "uncond": {"scale": torch.zeros(2)}}
    for sampler, knobs in (("unipc", {}), ("ddim", {"eta": 1.0})):
        with pytest.raises(ValueError, match="CFG\\+\\+ is defined here for ddim and euler"):
            sample(
                _two_branch_model,
                noise,
                ZERO_TERMINAL_SNR,
                sampler=sampler,
                shaping=guidance.Shaping(cfg_pp=True),
                guidance_scale=0.5,
                **kwargs,
                **knobs,
            )


def test_cfg_zero_init_is_zero_flow_velocity(gen):
    """CFG-Zero*'s zero-init: the first step runs no model and predicts ``x0 = x / (a + s)`` (eps = x0, flow velocity
    0), so a DDIM step from it keeps the flow state ``x / (a + s)``: the paper's ``v = 0``. Later steps guide."""
    x, cond, uncond = _inputs(gen)
    calls = []

    def counted(x, t, ac, **kw):
        calls.append(t)
        return _conditional_denoiser()(x, t, ac, **kw)

    guided = guidance.cfg(counted, 3.0, uncond, shaping=guidance.Shaping(zero_init=1), space="x0")
    ac, ac_next = 0.0, 0.2
    x0 = guided(x, 999, ac, **cond)
    assert calls == []
    eps = (x - ac**0.5 * x0) / (1 - ac) ** 0.5
    x_next = ac_next**0.5 * x0 + (1 - ac_next) ** 0.5 * eps
    torch.testing.assert_close(x_next / (ac_next**0.5 + (1 - ac_next) ** 0.5), x / (ac**0.5 + (1 - ac) ** 0.5))
    out = guided(x_next, 800, ac_next, **cond)
    plain = guidance.cfg(_conditional_denoiser(), 3.0, uncond, space="x0")(x_next, 800, ac_next, **cond)
    assert calls == [800] and torch.equal(out, plain)
    with pytest.raises(ValueError, match="zero_init"):
        guidance.Shaping(zero_init=-1)
