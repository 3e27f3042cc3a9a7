"""Sampling Stable Diffusion (fullrange.sd.sample): each mode (img2img, ControlNet, inpainting with a 9-channel and
a plain UNet) against diffusers' own pipeline with the same scheduler, and the library entry points the CLI uses
(sampling into a folder, provenance)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from fullrange.diffusers import FullrangeScheduler


def test_sample_img2img_equals_diffusers_img2img_pipeline_with_the_scheduler(tiny_sd, tmp_path):
    """``fullrange sample --image --strength`` gives the images of diffusers' img2img pipeline with the same
    scheduler, image latents and per-image seeds (the pipeline is handed the latents, since it draws the VAE's
    posterior where fullrange takes its mean); strength 1 at zero terminal SNR is plain text-to-image."""

    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    from fullrange.images import read_image
    from fullrange.sampling import retrained
    from fullrange.sd import load_stable_diffusion
    from fullrange.sd.sample import SampleSettings, generate

    model = load_stable_diffusion(tiny_sd)
    model = replace(model, spec=retrained(model.spec, "v_prediction", zero_terminal_snr=True))
    path = tmp_path / "in.png"
    Image.fromarray((torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(10)) * 255).byte().numpy()).save(
        path
    )
    latents = model.encode_images(read_image(path, 16, "image")[None])[0].expand(2, -1, -1, -1)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config | {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    pipe.scheduler = FullrangeScheduler.from_config(config, sampler="dpmpp_2m", spacing="trailing")
    prompts = ["a dark room", "a bright beach"]
    for strength in (0.3, 0.7):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        kwargs = {"strength": strength, "num_inference_steps": 10, "guidance_scale": 3.0, "output_type": "pt"}
        theirs = pipe(prompts, image=latents, generator=gens, **kwargs).images
        settings = SampleSettings(
            "dpmpp_2m", 10, "trailing", guidance=3.0, image=str(path), strength=strength, guidance_rescale=0.0
        )
        torch.testing.assert_close(generate(model, prompts, settings), theirs, atol=2e-4, rtol=0)
    plain = SampleSettings("dpmpp_2m", 10, "trailing", guidance=3.0, guidance_rescale=0.0)
    full = SampleSettings("dpmpp_2m", 10, "trailing", guidance=3.0, image=str(path), strength=1.0, guidance_rescale=0.0)
    torch.testing.assert_close(generate(model, prompts, full), generate(model, prompts, plain))


def test_sample_with_a_controlnet_equals_diffusers_controlnet_pipeline(tiny_sd, tmp_path):
    """``fullrange sample --controlnet --control-image`` gives the images of diffusers' ControlNet pipeline with the
    same scheduler and noise; the CLI loads a ControlNet folder and refuses half of the pair."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from PIL import Image
    from typer.testing import CliRunner

    from fullrange.cli import app
    from fullrange.sd import load_stable_diffusion
    from fullrange.sd.sample import SampleSettings, generate

    base = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32))
    controlnet.save_pretrained(tmp_path / "cn")
    control = tmp_path / "edges.png"
    Image.fromarray((torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(11)) * 255).byte().numpy()).save(
        control
    )
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FullrangeScheduler.from_config(pipe.scheduler.config, sampler="unipc", spacing="trailing")
    prompts = ["a dark room", "a bright beach"]
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    kwargs = {"num_inference_steps": 6, "guidance_scale": 3.0, "height": 16, "width": 16, "output_type": "pt"}
    theirs = pipe(prompts, image=Image.open(control), latents=noise, controlnet_conditioning_scale=0.8, **kwargs).images
    settings = SampleSettings("unipc", 6, "trailing", guidance=3.0, control_image=str(control), control_scale=0.8)
    ours = generate(load_stable_diffusion(tiny_sd), prompts, settings, controlnet=controlnet)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)

    runner = CliRunner()
    args = ["sample", "--model", str(tiny_sd), "--prompt", "x", "--steps", "3"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--controlnet", str(tmp_path / "cn")])
    assert result.exit_code != 0 and "--controlnet and --control-image go together" in result.output
    cli = [*args, "--out", str(tmp_path / "o"), "--controlnet", str(tmp_path / "cn"), "--control-image", str(control)]
    result = runner.invoke(app, cli)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "o").glob("000000-x*.png"))) == 1


def test_sample_inpaints_with_a_9_channel_unet_as_diffusers_inpainting_pipeline(tmp_path):
    """``fullrange sample --image --mask`` on an inpainting UNet (4 latent + 1 mask + 4 masked-image channels) gives
    diffusers' inpainting pipeline's images with the same scheduler, noise and masked-image latents; a 4-channel
    UNet is refused in one line that says what to use instead."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image
    from typer.testing import CliRunner

    from fullrange.cli import app
    from fullrange.sd import load_stable_diffusion
    from fullrange.sd.sample import SampleSettings, generate, inpaint_channels
    from fullrange.sd.testing import save_tiny_stable_diffusion

    folder = save_tiny_stable_diffusion(tmp_path / "inpaint", in_channels=9)
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray((torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(12)) * 255).byte().numpy()).save(
        image
    )
    white = torch.zeros(16, 16, dtype=torch.uint8)
    white[4:12, 6:] = 255
    Image.fromarray(white.numpy()).save(mask)
    model = load_stable_diffusion(folder)
    prompts = ["a dark room", "a bright beach"]
    settings = SampleSettings("unipc", 6, "trailing", guidance=3.0, image=str(image), mask=str(mask))
    ours = generate(model, prompts, settings)

    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FullrangeScheduler.from_config(pipe.scheduler.config, sampler="unipc", spacing="trailing")
    extra = inpaint_channels(model, str(image), str(mask), (16, 16))
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    theirs = pipe(
        prompts,
        image=Image.open(image),
        mask_image=Image.open(mask),
        masked_image_latents=extra[:, 1:].expand(2, -1, -1, -1),
        latents=noise,
        strength=1.0,
        num_inference_steps=6,
        guidance_scale=3.0,
        height=16,
        width=16,
        output_type="pt",
    ).images
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    assert extra[0, 0].sum().item() == 4 * 5  # the white block at latent size, nearest

    args = ["sample", "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "o"), "--mask", str(mask)]
    result = CliRunner().invoke(app, [*args, "--model", str(folder)])
    assert result.exit_code != 0 and "--mask needs image" in result.output


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun"])
def test_sample_inpaints_with_a_plain_unet_as_diffusers_inpainting_pipeline(tiny_sd, tmp_path, sampler):
    """``--image --mask`` on a plain 4-channel UNet: fullrange blends the image back in after every step through the
    scheduler, as diffusers' inpainting pipeline does; both give the same images (the pipeline is handed the same
    image latents), at zero terminal SNR, and the CLI writes the PNG."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image
    from typer.testing import CliRunner

    from fullrange.cli import app
    from fullrange.images import read_image
    from fullrange.sampling import retrained
    from fullrange.sd import load_stable_diffusion
    from fullrange.sd.sample import SampleSettings, generate

    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray((torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(13)) * 255).byte().numpy()).save(
        image
    )
    white = torch.zeros(16, 16, dtype=torch.uint8)
    white[:, 8:] = 255
    Image.fromarray(white.numpy()).save(mask)
    model = load_stable_diffusion(tiny_sd)
    model = replace(model, spec=retrained(model.spec, "v_prediction", zero_terminal_snr=True))
    prompts = ["a dark room", "a bright beach"]
    # The pipeline's rescale (none), not fullrange's zero-SNR default.
    settings = SampleSettings(
        sampler, 5, "trailing", guidance=3.0, image=str(image), mask=str(mask), guidance_rescale=0.0
    )
    ours = generate(model, prompts, settings)

    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config | {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    pipe.scheduler = FullrangeScheduler.from_config(config, sampler=sampler, spacing="trailing")
    latents = model.encode_images(read_image(image, 16, "image")[None])[0].expand(2, -1, -1, -1)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    kwargs = {"num_inference_steps": 5, "guidance_scale": 3.0, "height": 16, "width": 16, "output_type": "pt"}
    theirs = pipe(
        prompts, image=latents, mask_image=Image.open(mask), masked_image_latents=latents, latents=noise, **kwargs
    ).images
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)

    cli = ["sample", "--model", str(tiny_sd), "--prompt", "x", "--steps", "3", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*cli, "--image", str(image), "--mask", str(mask), "--sampler", sampler])
    assert result.exit_code == 0, result.output


def test_sample_to_folder_keeps_each_images_seed_and_overwrites_nothing(tiny_sd, tmp_path):
    """Prompts × images sampled in batches: image i of the run from seed + i whatever the batch (equal to sampling it
    alone), one PNG each with its own seed in its chunk, a grid, and a second run into the folder takes new names."""
    from fullrange.sd import load_stable_diffusion
    from fullrange.sd.sample import SampleSettings, generate, sample_to_folder

    model = load_stable_diffusion(tiny_sd)
    settings = SampleSettings("ddim", 3, "trailing", guidance=2.0, seed=5)
    paths, grid = sample_to_folder(
        model, ["a", "b"], settings, tmp_path, num_images=2, batch_size=3, progress=False, source={"model": "m"}
    )
    assert [p.name for p in paths] == ["000005-a.png", "000006-a.png", "000007-b.png", "000008-b.png"]
    assert grid.name == "grid-000005.png" and Image.open(grid).size == (2 * 16 * 2, 16)
    alone = generate(model, ["b"], replace(settings, seed=8))[0]
    pixels = torch.from_numpy(np.asarray(Image.open(paths[3]), dtype=np.float32)).permute(2, 0, 1) / 255
    assert (pixels - alone).abs().max() <= 1 / 255 + 1e-6  # the batch of 3 changed nothing but rounding
    info = json.loads(Image.open(paths[2]).text["fullrange"])
    assert (info["prompt"], info["seed"], info["model"], info["resolution"]) == ("b", 7, "m", 16)
    again, _ = sample_to_folder(model, ["a"], settings, tmp_path, progress=False)
    assert again[0].name == "000005-a-2.png"
    with pytest.raises(ValueError, match="num_images must be positive"):
        sample_to_folder(model, ["a"], settings, tmp_path, num_images=0)


def test_provenance_names_the_model_and_adapter_with_a1111_hashes(tiny_sd, tmp_path):
    import hashlib
    import struct

    from fullrange.sd import load_stable_diffusion
    from fullrange.sd.pnginfo import source

    model = load_stable_diffusion(tiny_sd)
    lora = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, lora, metadata={"note": "metadata is not hashed"})
    found = source(model, lora, 0.5, "bf16")
    unet = (tiny_sd / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    (header,) = struct.unpack("<Q", lora.read_bytes()[:8])
    assert found["model_hash"] == hashlib.sha256(unet).hexdigest()[:10]
    assert found["adapter_hash"] == hashlib.sha256(lora.read_bytes()[8 + header :]).hexdigest()[:12]
    assert (found["adapter_strength"], found["dtype"], found["prediction_type"]) == (0.5, "bf16", "epsilon")
    assert source(model)["adapter"] is None


def test_load_controlnet_names_the_option(tiny_sd, tmp_path):
    from fullrange.config import ConfigError
    from fullrange.sd import load_stable_diffusion
    from fullrange.sd.load import load_controlnet

    model = load_stable_diffusion(tiny_sd)
    with pytest.raises(ConfigError, match="not a folder") as err:
        load_controlnet(tmp_path / "none", model)
    assert err.value.field == "controlnet"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a loadable ControlNet"):
        load_controlnet(tmp_path / "empty", model)


def test_png_text_drops_control_characters_and_keeps_newlines():
    """A prompt's NUL and terminal escapes do not reach A1111's ``parameters``; its newlines do (as A1111 writes)."""
    from fullrange.sd.pnginfo import text_chunks
    from fullrange.sd.sample import SampleSettings

    settings = replace(SampleSettings("ddim", 3), resolution=16, width=16, height=24, spacing="trailing")
    chunks = text_chunks(settings, 7, "a dark\nroom\x00\x1b[2J", {"model": "m"})
    assert chunks["parameters"].startswith("a dark\nroom[2J\n") and "\x00" not in chunks["parameters"]
    assert (
        "Size: 16x24" in chunks["parameters"] and json.loads(chunks["fullrange"])["prompt"] == "a dark\nroom\x00\x1b[2J"
    )


def test_width_height_and_same_seed(tiny_sd, tmp_path):
    """--width / --height give images of that shape; with same_seed every prompt's image j has seed + j."""
    from fullrange.sd import load_stable_diffusion
    from fullrange.sd.sample import SampleSettings, generate, sample_to_folder

    model = load_stable_diffusion(tiny_sd)
    settings = SampleSettings("ddim", 2, "trailing", guidance=1.0, width=24, height=16)
    assert generate(model, ["a"], settings).shape == (1, 3, 16, 24)
    paths, _ = sample_to_folder(model, ["a", "b"], settings, tmp_path, num_images=2, same_seed=True, progress=False)
    assert [p.name for p in paths] == ["000000-a.png", "000001-a.png", "000000-b.png", "000001-b.png"]
    assert Image.open(paths[0]).size == (24, 16)


def test_guidance_shaping_from_the_command_line(tiny_sd, tmp_path):
    """`fullrange sample`'s guidance shaping reaches the sampler: an interval holding none of the run's σ samples
    as guidance 1 does; APG without its parallel part changes the image; a bad interval is one line."""
    from typer.testing import CliRunner

    from fullrange.cli import app
    from fullrange.sd.sample import SampleSettings

    args = ["sample", "--model", str(tiny_sd), "--prompt", "a", "--sampler", "ddim", "--steps", "3"]
    args += ["--spacing", "trailing", "--no-progress"]

    def pixels(name, *extra):
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        return np.asarray(Image.open(next((tmp_path / name).glob("*.png"))), dtype=np.int16)

    unguided = pixels("one", "--guidance", "1")
    never = pixels("never", "--guidance-interval", "1e6", "--guidance-interval", "1e7")
    assert np.array_equal(never, unguided)
    assert not np.array_equal(pixels("apg", "--apg-eta", "0"), pixels("cfg"))
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "bad"), "--guidance-interval", "3"])
    assert bad.exit_code == 2 and bad.output.startswith("error: --guidance-interval takes lo then hi")
    # CFG++ with its λ, and CFG-Zero*'s zero-init, change the image; CFG++ needs ddim or euler and λ <= 1.
    assert SampleSettings(guidance=0.6, cfg_pp=True).shaping.cfg_pp  # the default sampler, ddim, takes it
    plain = pixels("cfg-half", "--guidance", "0.6")
    assert not np.array_equal(pixels("cfgpp", "--guidance", "0.6", "--cfg-pp"), plain)
    assert not np.array_equal(pixels("zero-init", "--cfg-zero-init", "1"), pixels("cfg"))
    for extra, says in (
        (["--cfg-pp", "--sampler", "unipc", "--guidance", "0.5"], "error: --cfg-pp needs --sampler ddim or euler"),
        (["--cfg-pp", "--guidance", "3"], "error: --guidance must lie in [0, 1], got 3.0"),
    ):
        bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "bad"), *extra])
        assert bad.exit_code == 2 and bad.output.startswith(says), bad.output
