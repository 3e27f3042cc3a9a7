"""fullrange's ComfyUI nodes (``fullrange.comfyui``), run headlessly by ComfyUI's own code (``oracles``): loaded
the way ComfyUI loads a custom node, and sampled with ``comfy.sample`` / ``comfy.samplers`` on the SD 1.5 twin
(loaded through ComfyUI's model classes) against ``fullrange sample`` with the same noise and settings."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import oracles
import pytest
import torch

from fullrange import comfyui
from fullrange.sampling import retrained
from fullrange.sd import load_stable_diffusion
from fullrange.sd.export import export
from fullrange.sd.sample import SampleSettings, generate, seeded_noise
from fullrange.sd.testing import save_twin
from fullrange.sd.tone import colour_leak, parse_tone
from fullrange.timesteps import plan as timesteps_plan

SIDE = 64  # pixels: the twin's 8×8 latents
PROMPT = "a dark room"


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """The SD 1.5 twin in fullrange and in ComfyUI: the same exported file loaded by ComfyUI's model classes, its
    VAE as ComfyUI's; a copy exported as v + zero SNR (with markers) in a folder ComfyUI lists as checkpoints."""
    comfy = oracles.comfyui()
    root = tmp_path_factory.mktemp("comfyui")
    folder = save_twin(root / "base", "sd1")
    base = load_stable_diffusion(folder)
    checkpoint = export(root / "twin.safetensors", base, family="sd1", dtype=torch.float32)[0]
    v_model = replace(base, spec=retrained(base.spec, "v_prediction", zero_terminal_snr=True))
    (root / "checkpoints").mkdir()
    v_checkpoint = export(root / "checkpoints" / "twin_v.safetensors", v_model, family="sd1", dtype=torch.float32)[0]
    comfy.nodes.folder_paths.add_model_folder_path("checkpoints", str(root / "checkpoints"))
    patcher, _, _ = oracles.comfyui_load(comfy, checkpoint, folder, "sd1")
    vae = oracles.comfyui_vae(comfy, checkpoint, folder)
    return SimpleNamespace(comfy=comfy, folder=folder, base=base, v_checkpoint=v_checkpoint, model=patcher, vae=vae)


def _settings(model, twin, prediction: str, ztsnr: bool, rescale: float = 0.0):
    node = comfyui.ModelSettings()
    return node.apply(model, "(none)", prediction, "on" if ztsnr else "off", rescale)[0]


def _comfy_images(twin, model, sigmas, cfg, latent, seeds, sampler="euler", decode=True):
    """ComfyUI's SamplerCustom path (``comfy.sample.sample_custom``) with fullrange's conditioning tensors of the
    prompt and of the empty negative, decoded by fullrange's VAE (or, ``decode`` false, the latents in the UNet's
    units)."""
    comfy, fr = twin.comfy, twin.base
    positive = [[fr.condition(fr.encode_prompts([PROMPT]), None)["encoder_hidden_states"], {}]]
    negative = [[fr.condition(fr.encode_prompts([""]), None)["encoder_hidden_states"], {}]]
    noise = seeded_noise((4, SIDE // 8, SIDE // 8), seeds)
    sampler = comfy.samplers.sampler_object(sampler)
    out = comfy.sample.sample_custom(
        model, noise, cfg, sampler, sigmas, positive, negative, latent, disable_pbar=True, seed=seeds[0]
    )
    latents = out * model.model.latent_format.scale_factor
    return fr.decode_latents(latents) if decode else latents


def _fullrange_images(twin, spec, seeds, steps, cfg, sampler="euler", decode=True, **settings):
    """``fullrange sample``'s images (or, ``decode`` false, its final latents: Euler's last x0 estimate)."""
    model = replace(twin.base, spec=spec)
    options = SampleSettings(sampler=sampler, steps=steps, spacing="trailing", guidance=cfg, width=SIDE, height=SIDE)
    images, latents = [], []
    for seed in seeds:
        steps_seen = []
        images.append(generate(model, [PROMPT], replace(options, seed=seed, **settings), callback=steps_seen.append))
        latents.append(steps_seen[-1].x0)
    return torch.cat(images) if decode else torch.cat(latents)


def test_the_nodes_load_as_comfyui_loads_a_custom_node(tmp_path):
    """The documented ``custom_nodes`` entry, loaded by ComfyUI's own ``load_custom_node``, registers the three
    nodes with their display names."""
    import asyncio

    comfy = oracles.comfyui()
    entry = tmp_path / "fullrange"
    entry.mkdir()
    (entry / "__init__.py").write_text(comfyui.CUSTOM_NODE_ENTRY)
    loaded = asyncio.run(comfy.nodes.load_custom_node(str(entry)))
    try:
        assert loaded
        for name, display in comfyui.NODE_DISPLAY_NAME_MAPPINGS.items():
            assert comfy.nodes.NODE_CLASS_MAPPINGS[name] is comfyui.NODE_CLASS_MAPPINGS[name]
            assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[name] == display
            assert comfy.nodes.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["required"]
    finally:
        for name in comfyui.NODE_CLASS_MAPPINGS:
            comfy.nodes.NODE_CLASS_MAPPINGS.pop(name, None)
            comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS.pop(name, None)


@pytest.mark.parametrize("ztsnr", [False, True])
def test_sigmas_are_fullranges_ladder_with_comfyuis_top_at_zero_snr(twin, ztsnr):
    """Trailing steps on SD's schedule: the node's σ are fullrange's, then 0; at zero terminal SNR the first is
    ComfyUI's cap (σ ≈ 4518.8) where fullrange's is ∞, and the rest agree."""
    from fullrange.sd import tools

    model = _settings(twin.model, twin, "v_prediction" if ztsnr else "epsilon", ztsnr)
    sigmas = comfyui.Sigmas().make(model, 10, "trailing")[0]
    spec = retrained(twin.base.spec, "v_prediction", zero_terminal_snr=True) if ztsnr else twin.base.spec
    ours = spec.schedule.sigmas[spec.plan(10, "trailing").long()]
    assert sigmas[-1] == 0 and len(sigmas) == 11
    if ztsnr:
        assert torch.isinf(ours[0]) and sigmas[0].item() == pytest.approx(tools.COMFYUI_ZSNR_SIGMA_MAX, abs=0.05)
        ours, sigmas = ours[1:], sigmas[1:]
    torch.testing.assert_close(sigmas[:-1].double(), ours, rtol=1e-5, atol=0)


def test_comfyui_samples_as_fullrange_with_the_nodes(twin, report):
    """Euler, 10 trailing steps, two seeds. SD's schedule, epsilon, guidance 3: ComfyUI's sampler on the nodes' model
    and σ gives ``fullrange sample``'s images to float32 rounding. v + zero terminal SNR, guidance 1: ComfyUI's first
    step from its capped σ ≈ 4518.8 differs from fullrange's exact one from σ = ∞ by a measured amount, all of which
    the cap explains: fullrange on ComfyUI's capped schedule gives ComfyUI's images to rounding again. (At guidance
    3 the random twin's UNet amplifies the float differences between attention implementations, ComfyUI's own
    variants differing by 2e-4 on one call, over the zero-SNR steps: not a measure of the nodes.)"""
    from fullrange.sampling import SamplingSpec
    from fullrange.schedules import Schedule

    seeds, steps = [0, 1], 10
    empty = torch.zeros(len(seeds), 4, SIDE // 8, SIDE // 8)
    eps_model = _settings(twin.model, twin, "epsilon", False)
    sigmas = comfyui.Sigmas().make(eps_model, steps, "trailing")[0]
    theirs = _comfy_images(twin, eps_model, sigmas, 3.0, empty, seeds)
    plain = (theirs - _fullrange_images(twin, twin.base.spec, seeds, steps, 3.0)).abs().max().item()
    assert plain < 2e-4

    v_model = _settings(twin.model, twin, "v_prediction", True)
    v_spec = retrained(twin.base.spec, "v_prediction", zero_terminal_snr=True)
    alphas_cumprod = v_spec.schedule.alphas_cumprod.clone()
    alphas_cumprod[-1] = comfyui.COMFYUI_ZSNR_ALPHA_CUMPROD
    capped_spec = SamplingSpec(Schedule(alphas_cumprod), "v_prediction", "trailing")
    sigmas = comfyui.Sigmas().make(v_model, steps, "trailing")[0]
    theirs = _comfy_images(twin, v_model, sigmas, 1.0, empty, seeds)
    exact = (theirs - _fullrange_images(twin, v_spec, seeds, steps, 1.0)).abs().max().item()
    capped = (theirs - _fullrange_images(twin, capped_spec, seeds, steps, 1.0)).abs().max().item()
    assert capped < 2e-4 and 10 * capped < exact < 5e-3
    report(f"ComfyUI nodes vs fullrange sample (SD 1.5 twin, euler, 10 trailing steps, 64 px), largest pixel "
           f"difference: SD's schedule, guidance 3: {plain:.1e}; v + zero terminal SNR, guidance 1: {exact:.1e} "
           f"(ComfyUI's σ_max 4518.8 vs ∞), {capped:.1e} against fullrange on ComfyUI's capped schedule")  # fmt: skip


def test_sigmas_node_and_sampling_of_a_flow_model_are_fullranges(twin, report):
    """The twin's UNet under ComfyUI's ModelSamplingSD3 (shift 3) is a rectified-flow model: the Sigmas node gives
    τ of fullrange's flow plan, 1 first (no cap), and ComfyUI's Euler on it gives ``fullrange sample``'s images for
    the same UNet read as a flow model (shift 3)."""
    from fullrange import schedules
    from fullrange.sampling import SamplingSpec

    seeds, steps = [0, 1], 10
    flow_model = twin.comfy.nodes_model_advanced.ModelSamplingSD3().patch(twin.model, 3.0)[0]
    sigmas = comfyui.Sigmas().make(flow_model, steps, "trailing")[0]
    flow = schedules.rectified_flow(3.0)
    expected = torch.cat([timesteps_plan(flow, steps) / 1000, torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(sigmas.double(), expected, rtol=0, atol=1e-6)
    assert sigmas[0] == 1.0
    empty = torch.zeros(len(seeds), 4, SIDE // 8, SIDE // 8)
    differences = []
    for cfg in (1.0, 3.0):
        theirs = _comfy_images(twin, flow_model, sigmas, cfg, empty, seeds)
        ours = _fullrange_images(twin, SamplingSpec(flow, "flow"), seeds, steps, cfg)
        differences.append((theirs - ours).abs().max().item())
    report(
        f"ComfyUI ModelSamplingSD3 + Sigmas vs fullrange sample, flow: {differences[0]:.1e} at guidance 1, "
        f"{differences[1]:.1e} at 3"
    )
    # At guidance 3 the random twin amplifies float differences between attention implementations (see the test
    # above): agreement to 1e-3, where a wrong shift or guidance would be off by far more.
    assert differences[0] < 2e-4 and differences[1] < 1e-3


def _as_toy(twin, monkeypatch):
    """Both UNets replaced by the exact epsilon of toy data (:class:`fullrange.toy.MixtureToy`: flat latents at
    seven levels), which learns a sample's brightness only through what leaks into x_t: a random UNet ignores the
    leak, a trained one and this one do not. Both sides call it with the same x and integer timestep."""
    from fullrange.toy import MixtureToy

    toy, schedule = MixtureToy(), twin.base.spec.schedule

    def eps(x, t):
        alpha_cumprod = float(schedule.alphas_cumprod_at(torch.as_tensor(t).flatten()[0].double().round()))
        x0 = toy.denoise(x, 0.0, alpha_cumprod)
        return (x - alpha_cumprod**0.5 * x0) / (1 - alpha_cumprod) ** 0.5

    monkeypatch.setattr(twin.model.model.diffusion_model, "forward", lambda x, timesteps, **kwargs: eps(x, timesteps))
    monkeypatch.setattr(twin.base.unet, "forward", lambda x, t, **kwargs: SimpleNamespace(sample=eps(x, t)))


def _stats_file(twin, path, level: float):
    """A tone-stats file whose draws are flat latents of mean about ``level`` (a strong, clear leak)."""
    from fullrange.leak import ToneStats
    from fullrange.sd.tone import save_stats

    coefficients = 0.05 * torch.randn(20, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coefficients[:, :, 0, 0] += level * SIDE // 8  # the orthonormal DCT's DC term of an 8 × 8 latent of that mean
    save_stats(path, ToneStats.from_coefficients(coefficients), twin.base, 20)
    return str(path)


def test_tone_node_gives_fullranges_leak_and_moves_brightness_as_fullrange(twin, monkeypatch, tmp_path, report):
    """The Tone latent of a colour is fullrange's leak of it (ComfyUI's VAE, raw units × the latent scale). Sampled by
    ComfyUI from Tone latents with a model that sees the leak (``_as_toy``), the final latents are ``fullrange
    sample --tone-stats``'s up to ComfyUI's start, which carries 1/sqrt(1 - ᾱ_T) more noise (0.24 % on SD's
    schedule), and a dark and a bright tone move their mean (the toy's brightness) as much as in fullrange."""
    seeds, steps, cfg = [0, 1, 2, 3], 10, 1.0
    scale = twin.model.model.latent_format.scale_factor
    for tone in ("0.05", "#f0e0c0"):
        latent = comfyui.Tone().make(twin.model, twin.vae, tone, SIDE, SIDE, 2)[0]["samples"]
        expected = colour_leak(twin.base, parse_tone(tone)).expand_as(latent)
        torch.testing.assert_close(latent * scale, expected, atol=1e-5, rtol=1e-4)
    _as_toy(twin, monkeypatch)
    model = _settings(twin.model, twin, "epsilon", False)
    sigmas = comfyui.Sigmas().make(model, steps, "trailing")[0]
    empty = torch.zeros(len(seeds), 4, SIDE // 8, SIDE // 8)
    none = {"ComfyUI": _comfy_images(twin, model, sigmas, cfg, empty, seeds, decode=False)}
    none["fullrange"] = _fullrange_images(twin, twin.base.spec, seeds, steps, cfg, decode=False)
    shift, worst = {}, 0.0
    for name, level in (("dark", -0.8), ("bright", 0.8)):
        stats = _stats_file(twin, tmp_path / f"{name}.safetensors", level)
        tone = comfyui.Tone().make(twin.model, twin.vae, "", SIDE, SIDE, len(seeds), tone_stats=stats)
        theirs = _comfy_images(twin, model, sigmas, cfg, tone[0]["samples"], seeds, decode=False)
        ours = _fullrange_images(twin, twin.base.spec, seeds, steps, cfg, decode=False, tone_stats=stats)
        worst = max(worst, (theirs - ours).abs().max().item())
        shift["ComfyUI", name] = (theirs.mean() - none["ComfyUI"].mean()).item()
        shift["fullrange", name] = (ours.mean() - none["fullrange"].mean()).item()
    assert worst < 5e-3
    assert shift["fullrange", "dark"] < -0.05 and shift["fullrange", "bright"] > 0.05
    for name in ("dark", "bright"):
        assert shift["ComfyUI", name] == pytest.approx(shift["fullrange", name], rel=0.02)
    described = ", ".join(f"{n}: ComfyUI {shift['ComfyUI', n]:+.3f}, fullrange {shift['fullrange', n]:+.3f}"
                          for n in ("dark", "bright"))  # fmt: skip
    report(
        f"Tone node on the twin with an exact toy denoiser, shift of the final latents' mean: {described}; "
        f"largest latent difference {worst:.1e}"
    )


def test_tone_node_image_and_statistics_give_fullranges_leaks(twin, tmp_path):
    """From an image (already at the size: no resampling) its lowest frequencies as ``--tone-image`` computes them;
    from a tone-stats file the draws of ``--tone-stats`` for the same seeds."""
    import numpy as np
    from PIL import Image

    from fullrange.leak import ToneStats
    from fullrange.sd.tone import image_leak, leak_for, save_stats

    scale = twin.model.model.latent_format.scale_factor
    pixels = (np.random.default_rng(0).random((SIDE, SIDE, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "ref.png")
    image = torch.from_numpy(pixels).float().div(255).unsqueeze(0)
    latent = comfyui.Tone().make(twin.model, twin.vae, "", SIDE, SIDE, 1, image=image)[0]["samples"]
    torch.testing.assert_close(latent * scale, image_leak(twin.base, tmp_path / "ref.png", (8, 8)), atol=1e-4, rtol=0)

    coefficients = torch.randn(20, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    save_stats(tmp_path / "stats.safetensors", ToneStats.from_coefficients(coefficients), twin.base, 20)
    node = comfyui.Tone().make(twin.model, twin.vae, "", SIDE, SIDE, 2, tone_stats=str(tmp_path / "stats.safetensors"),
                               seed=5)[0]["samples"]  # fmt: skip
    expected = leak_for(twin.base, (8, 8), [5, 6], tone_stats=str(tmp_path / "stats.safetensors"))
    torch.testing.assert_close(node * scale, expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="give exactly one of tone, image and tone_stats"):
        comfyui.Tone().make(twin.model, twin.vae, "0.1", SIDE, SIDE, 1, image=image)


def test_model_settings_reads_the_markers_of_the_file_and_applies_comfyuis_nodes(twin):
    """On the v + zero-SNR export (markers in the file), ``auto`` decides from the markers; the model ComfyUI then
    samples predicts v on its zero-SNR ladder with RescaleCFG; without a file the probe decides, and an impossible
    choice (zero SNR with epsilon) is refused."""
    from fullrange.sd import tools

    node = comfyui.ModelSettings()
    assert twin.v_checkpoint.name in node.INPUT_TYPES()["required"]["ckpt_name"][0]
    model, how = node.apply(twin.model, twin.v_checkpoint.name, "auto", "auto", 0.7)
    assert how == "v_prediction from the markers; zero terminal SNR on (markers); RescaleCFG 0.7"
    sampling = model.get_model_object("model_sampling")
    assert isinstance(sampling, twin.comfy.model_sampling.V_PREDICTION)
    assert sampling.sigma_max.item() == pytest.approx(tools.COMFYUI_ZSNR_SIGMA_MAX, abs=0.05)
    assert model.model_options.get("sampler_cfg_function") is not None
    _, how = node.apply(twin.model, "(none)", "auto", "auto", 0.7)
    assert how.split(" from the probe (cos(output, input) at t = T-1 is ")[0] in ("epsilon", "v_prediction")
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        node.apply(twin.model, "(none)", "epsilon", "on", 0.7)


def test_the_probe_reads_comfyuis_unet_as_fullranges_probe_reads_diffusers(twin, monkeypatch):
    """The node's probe calls ComfyUI's UNet at t = T-1: a UNet that returns its input (what an epsilon model does
    there) reads as epsilon, one that returns unrelated values as v."""
    unet = twin.model.model.diffusion_model
    monkeypatch.setattr(unet, "forward", lambda x, **kwargs: x.clone())
    assert comfyui.probe(twin.model).prediction == "epsilon"
    monkeypatch.setattr(
        unet, "forward", lambda x, **kwargs: torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    )
    assert comfyui.probe(twin.model).prediction == "v_prediction"


def test_comfyuis_model_sampling_sd3_is_fullranges_rectified_flow():
    """ComfyUI's ModelSamplingSD3 node (its own patch code) on an SD-architecture model: its "simple" sigmas are
    fullrange's trailing flow steps with the same shift, its timestep is ``t = 1000 tau``, its start is the flow
    interpolant and its denoised output is fullrange's x0 of a flow prediction. So a UNet converted to plain
    rectified flow is sampled by ComfyUI as fullrange samples it."""
    from fullrange import prediction, schedules, timesteps

    comfy = oracles.comfyui()
    patched = {}

    class Patcher:  # the part of ComfyUI's ModelPatcher the node touches
        model = SimpleNamespace(model_config=None)

        def clone(self):
            return self

        def add_object_patch(self, name, value):
            patched[name] = value

    comfy.nodes_model_advanced.ModelSamplingSD3().patch(Patcher(), shift=3.0)
    sampling = patched["model_sampling"]
    flow = schedules.rectified_flow(3.0)
    for steps in (4, 10, 25, 28):
        sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", steps).double()
        ours = timesteps.plan(flow, steps)
        if 1000 % steps:  # ComfyUI picks entries of its 1000-step table: 1 - floor(k T / S) / T before the shift
            k = torch.arange(steps, dtype=torch.float64)
            ours = 1000 * schedules.shift_time(1 - (k * 1000 / steps).floor() / 1000, 3.0)
        torch.testing.assert_close(sigmas[:-1] * 1000, ours, rtol=0, atol=2e-4)
        torch.testing.assert_close(sampling.timestep(sigmas[:-1]).double(), ours, rtol=0, atol=2e-4)
    g = torch.Generator().manual_seed(0)
    x0, noise, u = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    tau = 0.6
    ac = float(flow.alphas_cumprod_at(1000 * tau))
    start = sampling.noise_scaling(torch.tensor(tau), noise, x0)
    torch.testing.assert_close(start, prediction.to_flow_input(prediction.add_noise(x0, noise, ac), ac))
    denoised = sampling.calculate_denoised(torch.tensor(tau), u, start)
    torch.testing.assert_close(denoised, prediction.to_x0("flow", u, prediction.from_flow_input(start, ac), ac))
