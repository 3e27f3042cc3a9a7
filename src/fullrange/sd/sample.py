"""Sample Stable Diffusion with fullrange's samplers and guidance, as its spec says; PNGs carry their settings."""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import ConfigError, check_choice, check_finite, check_range
from ..denoiser import from_model, map_cond
from ..guidance import cfg
from ..images import tile
from ..prediction import add_noise
from ..samplers import SAMPLERS, StepInfo
from ..sampling import pick, sample
from ..timesteps import LADDERS, SPACINGS
from .model import StableDiffusion
from .tone import encode, leak_for, parse_tone, read_image


@dataclass(frozen=True)
class SampleSettings:
    """How to sample: ``sampler`` / ``spacing`` ``None`` take what :func:`fullrange.sampling.pick` picks for the latent
    size; ``resolution`` ``None`` the UNet's. ``image``: img2img from that file, starting at the step ``strength``
    picks as diffusers does (the last ``int(steps · strength)`` steps, at least one). ``control_image``: the
    ControlNet's condition, with ``control_scale``. ``mask``: inpaint ``image`` where the mask is white, with an
    inpainting UNet (latent channels + mask + masked image latents); at strength 1 from pure noise, as diffusers.
    At most one of ``tone`` (a brightness or #rrggbb colour), ``tone_image`` and ``tone_stats`` (files) sets the
    starting latent's leak (:mod:`fullrange.sd.tone`)."""

    sampler: str | None = None
    steps: int = 25
    spacing: str | None = None
    guidance: float = 7.5
    guidance_rescale: float = 0.0
    seed: int = 0
    resolution: int | None = None
    negative_prompt: str = ""
    tone: str | None = None
    tone_image: str | None = None
    tone_stats: str | None = None
    image: str | None = None
    strength: float = 1.0
    control_image: str | None = None
    control_scale: float = 1.0
    mask: str | None = None

    def __post_init__(self) -> None:
        check_finite(self)
        sources = [name for name in ("tone", "tone_image", "tone_stats") if getattr(self, name) is not None]
        if len(sources) > 1:
            raise ConfigError(sources[1], "is a second source of tone: give only one")
        if self.tone is not None:
            parse_tone(self.tone)
        if sources and self.image is not None:
            raise ConfigError(
                sources[0], "sets the start of a sample drawn from noise; with image the start is the image"
            )
        check_range("strength", self.strength, 0, 1, open_low=True)
        if self.mask is not None and self.image is None:
            raise ConfigError("mask", "needs image: the picture to inpaint")
        if self.mask is not None and self.control_image is not None:
            raise ConfigError("mask", "and a ControlNet together are not supported yet")
        if self.sampler is not None:
            check_choice("sampler", self.sampler, tuple(SAMPLERS))
        check_range("steps", self.steps, 0, open_low=True)
        if self.spacing is not None:
            check_choice("spacing", self.spacing, SPACINGS + LADDERS)
        check_range("guidance", self.guidance, 0)
        check_range("guidance_rescale", self.guidance_rescale, 0, 1)
        check_range("seed", self.seed, 0)
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise ConfigError("resolution", f"must be a positive multiple of 8, got {self.resolution}")


class ControlledUNet(torch.nn.Module):
    """A UNet with a ControlNet's residuals added, called as the UNet is, plus ``controlnet_cond`` (images in
    [0, 1], batched with the rest so guidance sees it in both branches)."""

    def __init__(self, unet: torch.nn.Module, controlnet: torch.nn.Module, scale: float = 1.0):
        super().__init__()
        self.unet, self.controlnet, self.scale = unet, controlnet, scale

    def forward(self, x, t, controlnet_cond, encoder_hidden_states, added_cond_kwargs=None):
        down, mid = self.controlnet(
            x,
            t,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=self.scale,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )
        extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
        return self.unet(
            x,
            t,
            encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            **extra,
        )


class InpaintingUNet(torch.nn.Module):
    """An inpainting UNet called as a plain one plus ``inpaint_channels`` (the mask and the masked image's latents,
    batched with the rest so guidance sees them in both branches), concatenated to its input as diffusers does."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, inpaint_channels, **cond):
        return self.unet(torch.cat([x, inpaint_channels.to(x.dtype)], dim=1), t, **cond)


def pixel_mask(model: StableDiffusion, mask: str, size: int) -> torch.Tensor:
    """(1, 1, H, W) booleans at pixel size: where the mask file is white (binarised at 0.5), to repaint."""
    return (read_image(mask, (size, size), model.vae_scale_factor, "mask").mean(0, keepdim=True)[None] + 1) / 2 >= 0.5


def latent_mask(binary: torch.Tensor, size: int) -> torch.Tensor:
    """(1, 1, h, w): a pixel mask at latent size (nearest), as diffusers' inpainting pipeline resizes it."""
    return torch.nn.functional.interpolate(binary.float(), size=(size, size))


def inpaint_channels(model: StableDiffusion, image: str, mask: str, size: int) -> torch.Tensor:
    """(1, 1 + C, h, w): the mask at latent size (white = repaint) and the latents of the image with the repainted
    part blacked out, as diffusers' inpainting pipeline builds them for a 9-channel UNet."""
    binary = pixel_mask(model, mask, size)
    pixels = read_image(image, (size, size), model.vae_scale_factor, "image")[None]
    return torch.cat([latent_mask(binary, size), encode(model, pixels * ~binary)], dim=1)


def resolve(model: StableDiffusion, settings: SampleSettings) -> tuple[SampleSettings, str]:
    """The settings sampling actually uses: the sampler and spacing :func:`~fullrange.sampling.pick` picks where
    none is given, and the UNet's own resolution; with the note saying what was picked (``""`` if nothing)."""
    resolution = settings.resolution or model.unet.config.sample_size * model.vae_scale_factor
    size = resolution // model.vae_scale_factor
    shape = (1, model.vae.config.latent_channels, size, size)
    sampler, spacing, note = pick(model.spec, shape, settings.sampler, settings.spacing)
    return replace(settings, sampler=sampler, spacing=spacing, resolution=resolution), note


@torch.no_grad()
def generate(
    model: StableDiffusion,
    prompts: list[str],
    settings: SampleSettings,
    callback=None,
    controlnet: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Images in [0, 1], shape (N, 3, H, W), one per prompt, seeds ``seed + i``; on the UNet's device. A tone in
    ``settings`` starts every sample from its leak (the same noise as without); an ``image`` starts it from that
    image noised to the step ``strength`` picks (img2img); a ``controlnet`` is conditioned on ``control_image``."""
    settings, note = resolve(model, settings)
    if note:
        logging.getLogger("fullrange").info(note)
    sampler, size = settings.sampler, settings.resolution // model.vae_scale_factor
    channels = model.vae.config.latent_channels
    inpainting_unet = model.unet.config.in_channels == 2 * channels + 1
    if settings.mask is not None and not inpainting_unet and model.unet.config.in_channels != channels:
        raise ConfigError("mask", f"a UNet of {model.unet.config.in_channels} input channels cannot inpaint")
    noise = torch.stack(
        [
            torch.randn(channels, size, size, generator=torch.Generator().manual_seed(settings.seed + i))
            for i in range(len(prompts))
        ]
    )
    device = model.unet.device
    pixels = (size * model.vae_scale_factor,) * 2
    time_ids = model.time_ids(pixels, (0, 0), pixels)
    time_ids = None if time_ids is None else time_ids.expand(len(prompts), -1)
    text = model.encode_prompts(prompts)
    if model.is_xl and not settings.negative_prompt:  # SDXL's empty negative prompt is zeros (diffusers' default)
        negative = {k: torch.zeros_like(v) for k, v in text.items()}
    else:
        negative = model.encode_prompts([settings.negative_prompt] * len(prompts))
    to_device = lambda v: v.to(device)  # noqa: E731
    tones = {"tone": settings.tone, "tone_image": settings.tone_image, "tone_stats": settings.tone_stats}
    leak = leak_for(model, len(prompts), (size, size), settings.seed, **tones)
    steps = model.spec.plan(settings.steps, settings.spacing, num_values=math.prod(noise.shape[1:]))
    start = noise
    if settings.image is not None:  # img2img: the last int(steps · strength) steps (at least one), as diffusers
        begin = min(settings.steps - int(settings.steps * settings.strength), settings.steps - 1)
        steps = steps[begin:]
        image = encode(model, read_image(settings.image, (size, size), model.vae_scale_factor, "image")[None])
        start = add_noise(image, noise, float(model.spec.schedule.alphas_cumprod_at(steps[:1].double())[0]))
        if settings.mask is not None and settings.strength == 1:  # inpainting from pure noise, as diffusers'
            start = noise
    cond, uncond = model.condition(text, time_ids), model.condition(negative, time_ids)
    network = model.unet
    if controlnet is not None:
        if settings.control_image is None:
            raise ConfigError("control_image", "is needed with a ControlNet")
        control = read_image(settings.control_image, (size, size), model.vae_scale_factor, "control_image")
        control = ((control + 1) / 2).expand(len(prompts), -1, -1, -1).to(device, model.unet.dtype)
        cond, uncond = cond | {"controlnet_cond": control}, uncond | {"controlnet_cond": control}
        network = ControlledUNet(model.unet, controlnet, settings.control_scale)
    if settings.mask is not None and not inpainting_unet:  # blend the image back in after every step, as diffusers
        mask = latent_mask(pixel_mask(model, settings.mask, size), size)
        latents = blended(model, start, noise, image, mask, steps, sampler, settings, cond, uncond, callback)
        return decode(model, latents)
    if settings.mask is not None:
        extra = inpaint_channels(model, settings.image, settings.mask, size).expand(len(prompts), -1, -1, -1)
        extra = extra.to(device, model.unet.dtype)
        cond, uncond = cond | {"inpaint_channels": extra}, uncond | {"inpaint_channels": extra}
        network = InpaintingUNet(model.unet)
    latents = sample(
        network,
        start.to(device),
        model.spec,
        sampler=sampler,
        steps=steps,
        cond=map_cond(to_device, cond),
        uncond=map_cond(to_device, uncond),
        guidance_scale=settings.guidance,
        guidance_rescale=settings.guidance_rescale,
        callback=callback,
        generator=torch.Generator().manual_seed(settings.seed),
        leak=None if leak is None else leak.to(device),
    )
    return decode(model, latents)


def decode(model: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] from the UNet's latents, through the VAE."""
    latents = latents.to(model.vae.device, model.vae.dtype) / model.vae.config.scaling_factor
    images = model.vae.decode(latents).sample
    return ((images.float().cpu() + 1) / 2).clamp(0, 1)


def blended(model, start, noise, image, mask, steps, sampler, settings, cond, uncond, callback) -> torch.Tensor:
    """Inpainting with a plain UNet: the sampler steps on the whole latent, and after every step the part outside
    ``mask`` is replaced by ``image`` noised to the next step (the image itself after the last), as diffusers'
    inpainting pipeline does. Runs the sampler step by step through :class:`~fullrange.diffusers.FullrangeScheduler`,
    the one form of it that takes latents edited between steps."""
    from ..diffusers import FullrangeScheduler
    from ..scheduler_config import config_from_spec

    spec, device = model.spec, model.unet.device
    config = config_from_spec(spec) | {"prediction_type": "sample"}  # the guided denoiser hands it x0
    scheduler = FullrangeScheduler.from_config(config, sampler=sampler, spacing="trailing")
    scheduler.use_steps(steps, device)
    denoiser = from_model(model.unet, spec.prediction)
    if settings.guidance != 1.0:
        denoiser = cfg(denoiser, settings.guidance, map_cond(lambda v: v.to(device), uncond), settings.guidance_rescale)
    cond = map_cond(lambda v: v.to(device), cond)
    x, mask, image, noise = (v.to(device) for v in (start, mask, image, noise))
    ts = scheduler.timesteps
    g = torch.Generator().manual_seed(settings.seed)
    for k, t in enumerate(ts):
        ac = float(spec.schedule.alphas_cumprod_at(float(t)))
        x0 = denoiser(x, float(t), ac, **cond)
        x = scheduler.step(x0, t, x, generator=g).prev_sample
        if k + 1 < len(ts):
            kept = add_noise(image, noise, float(spec.schedule.alphas_cumprod_at(float(ts[k + 1]))))
        else:
            kept = image
        x = mask * x + (1 - mask) * kept
        if callback is not None:
            callback(StepInfo(k, len(ts), float(t), x, x0))
    return x


def save_images(
    images: torch.Tensor, prompts: list[str], settings: SampleSettings, out: Path, source: dict | None = None
) -> list[Path]:
    """One PNG per image, named by its seed (``settings.seed + i``) and a slug of its prompt, with a ``fullrange``
    text chunk (JSON: prompt, seed, ``settings`` and ``source``: what made it, see :mod:`fullrange.sd.pnginfo`) and
    A1111's ``parameters`` text. Nothing is overwritten: a name already taken gets ``-2``, ``-3``, ... Returns the
    paths."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from .pnginfo import a1111_parameters, describe

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (array, prompt) in enumerate(zip(arrays, prompts, strict=True)):
        info = describe(settings, settings.seed + i, prompt, source or {})
        png = PngInfo()
        png.add_text("fullrange", json.dumps(info))
        png.add_text("parameters", a1111_parameters(info, (array.shape[1], array.shape[0])))
        path, f = _new_file(out, f"{settings.seed + i:06d}-{_slug(prompt)}")
        with f:
            Image.fromarray(array).save(f, format="PNG", pnginfo=png)
        paths.append(path)
    return paths


def save_grid(images: torch.Tensor, out: Path, seed: int, columns: int = 4) -> Path:
    """All ``images`` (in [0, 1]) as one PNG grid, ``grid-SEED.png`` (never overwriting: ``-2``, ... if taken)."""
    from PIL import Image

    arrays = (images * 255).round().to(torch.uint8)
    grid, f = _new_file(out, f"grid-{seed:06d}")
    with f:
        Image.fromarray(tile(arrays, columns=columns).numpy()).save(f, format="PNG")
    return grid


def _slug(prompt: str, length: int = 40) -> str:
    """``"A dark alley, in the rain!"`` → ``"a-dark-alley-in-the-rain"``; ``"image"`` when nothing is left."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:length].rstrip("-") or "image"


def _new_file(folder: Path, stem: str):
    """A PNG path in ``folder`` no file has, opened for writing (created exclusively, so two runs cannot both
    take it): ``stem.png``, else ``stem-2.png``, ``stem-3.png``, ..."""
    for n in itertools.count(1):
        path = folder / f"{stem}{'' if n == 1 else f'-{n}'}.png"
        try:
            return path, path.open("xb")
        except FileExistsError:
            continue
    raise AssertionError("unreachable")
