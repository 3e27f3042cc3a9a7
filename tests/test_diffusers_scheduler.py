"""``fullrange.diffusers.FullrangeScheduler``: fullrange's samplers, step by step, inside diffusers' pipelines."""

from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionXLPipeline

import fullrange
from fullrange import prediction, schedules, timesteps, toy
from fullrange.diffusers import FullrangeScheduler
from fullrange.samplers import SAMPLERS
from fullrange.sampling import SamplingSpec

SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
ZTSNR = schedules.rescale_zero_terminal_snr(schedules.scaled_linear())
DATA = toy.MixtureToy()


def _config(zero_terminal_snr: bool) -> dict:
    prediction_type = "v_prediction" if zero_terminal_snr else "epsilon"
    return DDIMScheduler(**SD_CONFIG, rescale_betas_zero_snr=zero_terminal_snr, prediction_type=prediction_type).config


def _network(spec: SamplingSpec):
    """The toy's exact denoiser as a network predicting what ``spec`` says, called like a UNet."""

    def network(x_t, t):
        t = float(torch.as_tensor(t).flatten()[0])
        ac = float(spec.schedule.alphas_cumprod_at(t))
        x0 = DATA.denoise(x_t, t, ac)
        out = prediction.to_v(x0, x_t, ac) if spec.prediction == "v_prediction" else prediction.to_eps(x0, x_t, ac)
        return out.to(x_t.dtype)

    return network


def _run(scheduler, network, x, steps, begin=None, seed=0):
    """A pipeline's loop: set_timesteps, then model + step at each timestep (from ``begin`` on, as img2img)."""
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps
    if begin is not None:
        scheduler.set_begin_index(begin)
        ts = ts[begin:]
    g = torch.Generator().manual_seed(seed)
    for t in ts:
        x = scheduler.step(network(scheduler.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("spacing", ["trailing", "karras"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_scheduler_steps_as_fullrange_sample(sampler, spacing, zero_terminal_snr):
    """Driven like a pipeline, the scheduler gives fullrange.sample's result (same ladder, same noise draws)."""
    config = _config(zero_terminal_snr)
    scheduler = FullrangeScheduler.from_config(config, sampler=sampler, spacing=spacing, num_values=3 * 8 * 8)
    spec = scheduler.spec
    assert spec.schedule.zero_terminal_snr == zero_terminal_snr
    network = _network(spec)
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = _run(scheduler, network, noise, 7)
    g = torch.Generator().manual_seed(0)
    expected = fullrange.sample(network, noise, spec, sampler=sampler, steps=7, spacing=spacing, generator=g)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc"])
@pytest.mark.parametrize("strength", [0.3, 0.7, 1.0])
def test_img2img_begins_first_order_at_its_start(sampler, strength):
    """img2img: the pipeline noises the image to the step strength picks and starts there; the result is
    fullrange.sample on the remaining steps from that point (a multistep sampler has no history before it)."""
    scheduler = FullrangeScheduler.from_config(_config(True), sampler=sampler, spacing="trailing")
    network = _network(scheduler.spec)
    image = DATA.sample((2, 3, 8, 8), torch.Generator().manual_seed(2)).float()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler.set_timesteps(10)
    begin = 10 - min(int(10 * strength), 10)
    start = scheduler.add_noise(image, noise, scheduler.timesteps[begin : begin + 1])
    ours = _run(scheduler, network, start, 10, begin=begin)
    steps = scheduler.timesteps[begin:]
    expected = fullrange.sample(network, start, scheduler.spec, sampler=sampler, steps=steps)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    if strength == 1.0:  # at zero terminal SNR the start is pure noise: the image is gone
        torch.testing.assert_close(start, noise)


def test_default_picks_for_the_latent_size_and_saves_with_its_config(tmp_path):
    scheduler = FullrangeScheduler.from_config(_config(True))
    assert (scheduler.sampler, scheduler.spacing) == ("ddim", "trailing") and "trailing steps" in scheduler.note
    scheduler = FullrangeScheduler.from_config(_config(True), spacing="karras", num_values=4 * 128 * 128)
    scheduler.set_timesteps(6)
    expected = timesteps.ladder(ZTSNR, 6, "karras", num_values=4 * 128 * 128).float()
    torch.testing.assert_close(scheduler.timesteps, expected)
    scheduler = FullrangeScheduler.from_config(_config(True), sampler="ddim", sampler_options={"eta": 0.5})
    scheduler.save_config(tmp_path)
    loaded = FullrangeScheduler.from_pretrained(tmp_path)
    assert (loaded.sampler, loaded.options, loaded.spec.prediction) == ("ddim", {"eta": 0.5}, "v_prediction")
    assert loaded.spec.schedule.zero_terminal_snr


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        FullrangeScheduler.from_config(_config(True), sampler="plms")
    with pytest.raises(ValueError, match="has no option order"):
        FullrangeScheduler.from_config(_config(True), sampler="ddim", sampler_options={"order": 2})
    with pytest.raises(ValueError, match="zero terminal SNR with epsilon"):
        FullrangeScheduler.from_config(_config(True) | {"prediction_type": "epsilon"})
    scheduler = FullrangeScheduler.from_config(_config(True), sampler="ddim")
    with pytest.raises(ValueError, match="call set_timesteps"):
        scheduler.step(torch.zeros(1), 999, torch.zeros(1))


def test_finite_where_diffusers_fails_at_zero_terminal_snr():
    """diffusers #12771: DPM++ with Karras sigmas and zero terminal SNR fails at 25 steps or more; fullrange's
    Karras ladder starts at σ = ∞ exactly and stays finite."""
    config = DPMSolverMultistepScheduler(
        **SD_CONFIG, rescale_betas_zero_snr=True, prediction_type="v_prediction", use_karras_sigmas=True
    ).config
    scheduler = FullrangeScheduler.from_config(config, sampler="dpmpp_2m", spacing="karras")
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    out = _run(scheduler, _network(scheduler.spec), noise, 30)
    assert torch.isfinite(out).all() and scheduler.timesteps[0].item() == 999.0


def test_in_a_stable_diffusion_pipeline_it_gives_fullrange_sample_images(tiny_sd, diffusers_images):
    """The tiny SD pipeline with the scheduler gives the images of ``fullrange sample`` with the same settings."""
    from diffusers import StableDiffusionPipeline

    from fullrange.sd import load_stable_diffusion
    from fullrange.sd.sample import SampleSettings, generate

    prompts = ["a dark room", "a bright beach"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    for sampler in ("ddim", "dpmpp_2m", "unipc", "heun"):
        pipe.scheduler = FullrangeScheduler.from_config(pipe.scheduler.config, sampler=sampler, spacing="trailing")
        theirs = diffusers_images(pipe, prompts, 5, 3.0)
        settings = SampleSettings(sampler=sampler, steps=5, spacing="trailing", guidance=3.0)
        ours = generate(load_stable_diffusion(tiny_sd), prompts, settings)
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_inpainting_blends_between_steps_and_keeps_the_unmasked_latents(tiny_sd):
    """A 4-channel UNet in diffusers' inpainting pipeline: the pipeline replaces the unmasked latents with the
    image's, noised to the next step, after every step. The scheduler steps from what it is given: the result
    keeps the image's latents outside the mask exactly and is finite inside, at zero terminal SNR too."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config | {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    image = Image.fromarray((torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(5)) * 255).byte().numpy())
    mask = torch.zeros(16, 16, dtype=torch.uint8)
    mask[:, 8:] = 255
    for sampler in ("ddim", "dpmpp_2m", "unipc"):
        pipe.scheduler = FullrangeScheduler.from_config(config, sampler=sampler, spacing="trailing")
        kwargs = {"prompt": "x", "image": image, "mask_image": Image.fromarray(mask.numpy()), "height": 16, "width": 16}
        g = torch.Generator().manual_seed(8)
        latents = pipe(**kwargs, num_inference_steps=5, strength=0.7, output_type="latent", generator=g).images
        # The pipeline's first draw from the generator is its VAE sample of the image.
        image_latents = pipe._encode_vae_image(pipe.image_processor.preprocess(image), torch.Generator().manual_seed(8))
        assert torch.isfinite(latents).all()
        torch.testing.assert_close(latents[..., :4], image_latents[..., :4], atol=1e-5, rtol=0)


def test_controlnet_pipeline_with_ddim_equals_diffusers_ddim(tiny_sd):
    """In a ControlNet pipeline (a tiny ControlNet from the UNet's config), fullrange's DDIM on trailing steps gives
    diffusers' DDIMScheduler images (10 trailing steps end at t = -1 there, i.e. on x0, as ours do)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32))
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    config = pipe.scheduler.config | {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": True}
    images = []
    for scheduler in (DDIMScheduler.from_config(config), FullrangeScheduler.from_config(config, sampler="ddim")):
        pipe.scheduler = scheduler
        kwargs = {"prompt": "x", "image": control, "height": 16, "width": 16, "latents": latents}
        images.append(pipe(**kwargs, num_inference_steps=10, guidance_scale=3.0, output_type="pt").images)
    torch.testing.assert_close(images[1], images[0], atol=2e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun"])
def test_sdxl_base_hands_off_to_the_refiner_at_denoising_end(tiny_sdxl, sampler):
    """SDXL's ensemble of experts: the base stops at denoising_end = 0.6 with noisy latents, the img2img pipeline
    goes on from denoising_start = 0.6 on the same ladder. With the same UNet, a one-step sampler gives the
    single run's result exactly; a multistep one restarts its history (first order) and stays close."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    base.set_progress_bar_config(disable=True)
    config = base.scheduler.config | {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    base.scheduler = FullrangeScheduler.from_config(config, sampler=sampler, spacing="trailing")
    refiner = StableDiffusionXLImg2ImgPipeline(**base.components)
    refiner.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    kwargs = {"prompt": "x", "num_inference_steps": 8, "guidance_scale": 1.0, "output_type": "latent"}
    whole = base(**kwargs, latents=latents, height=16, width=16).images
    handed = base(**kwargs, latents=latents, height=16, width=16, denoising_end=0.6).images
    assert not torch.allclose(handed, whole)  # it did stop early, with noise left
    refined = refiner(**kwargs, image=handed, denoising_start=0.6).images
    assert torch.isfinite(refined).all()
    if sampler == "ddim":
        torch.testing.assert_close(refined, whole, atol=1e-5, rtol=0)
    else:
        assert (refined - whole).abs().max() < 0.25 * whole.abs().max()


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_sd):
    """An image, a mask, a control image, an inpainting (9-channel) model and a ControlNet, for the matrix below."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from PIL import Image

    from fullrange.sd.testing import save_tiny_stable_diffusion

    root = tmp_path_factory.mktemp("assets")
    for name, seed in (("image", 20), ("control", 21)):
        pixels = torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(seed))
        Image.fromarray((pixels * 255).byte().numpy()).save(root / f"{name}.png")
    white = torch.zeros(16, 16, dtype=torch.uint8)
    white[2:14, 8:] = 255
    Image.fromarray(white.numpy()).save(root / "mask.png")
    save_tiny_stable_diffusion(root / "inpaint9", in_channels=9)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).save_pretrained(root / "controlnet")
    return root


PIPELINES = ("txt2img", "img2img", "inpaint", "inpaint9", "controlnet", "sdxl")


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
@pytest.mark.parametrize("kind", PIPELINES)
def test_every_pipeline_gives_the_images_of_fullrange_sample(
    kind, sampler, zero_terminal_snr, tiny_sd, tiny_sdxl, assets
):
    """Each diffusers pipeline with FullrangeScheduler against ``fullrange sample`` with the same settings: a
    first-order, a multistep and a second-order sampler, zero terminal SNR off and on (img2img at strength 0.7,
    handed the same image latents; inpainting and ControlNet on their tiny models)."""
    import diffusers
    from diffusers import ControlNetModel
    from PIL import Image

    from fullrange.images import read_image
    from fullrange.sampling import retrained
    from fullrange.sd import load_stable_diffusion
    from fullrange.sd.sample import SampleSettings, generate

    folder = {"sdxl": tiny_sdxl, "inpaint9": assets / "inpaint9"}.get(kind, tiny_sd)
    classes = {
        "txt2img": "StableDiffusionPipeline",
        "img2img": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
        "inpaint9": "StableDiffusionInpaintPipeline",
        "controlnet": "StableDiffusionControlNetPipeline",
        "sdxl": "StableDiffusionXLPipeline",
    }
    extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    if kind == "controlnet":
        extra["controlnet"] = controlnet = ControlNetModel.from_pretrained(assets / "controlnet")
    pipe = getattr(diffusers, classes[kind]).from_pretrained(folder, **extra)
    pipe.set_progress_bar_config(disable=True)
    model = load_stable_diffusion(folder)
    config = dict(pipe.scheduler.config)
    if zero_terminal_snr:
        config |= {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
        model = replace(model, spec=retrained(model.spec, "v_prediction", zero_terminal_snr=True))
    pipe.scheduler = FullrangeScheduler.from_config(config, sampler=sampler, spacing="trailing")

    prompts = ["a dark room", "a bright beach"]
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    image = str(assets / "image.png")
    latents = model.encode_images(read_image(image, 16, "image")[None])[0].expand(2, -1, -1, -1)
    settings = {"guidance": 3.0, "guidance_rescale": 0.0, "resolution": 16}  # the pipelines' rescale: none
    call = {"num_inference_steps": 5, "guidance_scale": 3.0, "output_type": "pt"}
    if kind == "img2img":
        settings |= {"image": image, "strength": 0.7}
        call |= {"image": latents, "strength": 0.7, "generator": [torch.Generator().manual_seed(i) for i in range(2)]}
    else:
        call |= {"latents": noise, "height": 16, "width": 16}
    if kind.startswith("inpaint"):
        settings |= {"image": image, "mask": str(assets / "mask.png")}
        masked = latents
        if kind == "inpaint9":
            from fullrange.sd.sample import inpaint_channels

            masked = inpaint_channels(model, image, settings["mask"], (16, 16))[:, 1:].expand(2, -1, -1, -1)
        call |= {"image": latents, "mask_image": Image.open(assets / "mask.png"), "masked_image_latents": masked}
    if kind == "controlnet":
        settings |= {"control_image": str(assets / "control.png")}
        call |= {"image": Image.open(assets / "control.png")}
    theirs = pipe(prompts, **call).images
    ours = generate(
        model,
        prompts,
        SampleSettings(sampler, 5, "trailing", **settings),
        controlnet=controlnet if kind == "controlnet" else None,
    )
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_exact_where_diffusers_schedulers_fail_at_zero_terminal_snr():
    """The zero-SNR cases where diffusers' own schedulers fail (tests/test_known_upstream.py): with a model that
    knows x0, the scheduler's DDIM and Heun with trailing steps return x0, and fullrange's guidance rescale keeps a
    constant prediction (zero std) as it is."""
    from fullrange.guidance import rescale

    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(14))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(15))

    def oracle(spec):
        def network(x_t, t):
            ac = float(spec.schedule.alphas_cumprod_at(float(torch.as_tensor(t).flatten()[0])))
            return prediction.to_v(x0, x_t, ac)

        return network

    for sampler in ("ddim", "heun"):
        ours = FullrangeScheduler.from_config(_config(True), sampler=sampler, spacing="trailing")
        torch.testing.assert_close(_run(ours, oracle(ours.spec), noise, 7), x0, atol=1e-5, rtol=0)
    flat = torch.zeros(1, 4, 8, 8)
    torch.testing.assert_close(rescale(flat, flat, 0.7), flat)


def test_guide_puts_fullrange_guidance_in_a_pipeline(tiny_sd):
    """``guide``: the pipeline called with its own guidance_scale and guidance_rescale gives ``fullrange sample``'s
    images with the same guidance, rescale (v space) and shaping; removing the hook restores the pipeline's CFG."""
    from diffusers import StableDiffusionPipeline

    from fullrange.diffusers import guide
    from fullrange.sd import load_stable_diffusion
    from fullrange.sd.sample import SampleSettings, generate

    prompts = ["a dark room", "a bright beach"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = FullrangeScheduler.from_config(pipe.scheduler.config, sampler="ddim", spacing="trailing")
    pipe.set_progress_bar_config(disable=True)

    def run():
        noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)])
        kwargs = {"guidance_scale": 3.0, "guidance_rescale": 0.5, "height": 16, "width": 16, "output_type": "pt"}
        return pipe(prompts, num_inference_steps=5, latents=noise, **kwargs).images

    plain = run()
    settings = SampleSettings(
        sampler="ddim",
        steps=5,
        spacing="trailing",
        guidance=3.0,
        guidance_rescale=0.5,
        cfg_zero_star=True,
        apg_eta=0.0,
        apg_momentum=-0.5,
    )
    handle = guide(pipe, settings.shaping)
    theirs, again = run(), run()
    ours = generate(load_stable_diffusion(tiny_sd), prompts, settings)
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=0)
    torch.testing.assert_close(again, theirs, atol=0, rtol=0)  # momentum starts afresh with each call
    assert (theirs - plain).abs().max() > 1e-3
    handle.remove()
    torch.testing.assert_close(run(), plain, atol=0, rtol=0)
    with pytest.raises(ValueError, match="CFG\\+\\+"):
        guide(pipe, settings.shaping.__class__(cfg_pp=True))
