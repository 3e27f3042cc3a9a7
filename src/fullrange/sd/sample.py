"""Sample Stable Diffusion with fullrange's samplers and guidance, as its spec says.

One path, made of parts: a *start* (pure noise, noise with a tone's leak, or an image noised to the step img2img
begins at), a *network* (the UNet, a UNet with a ControlNet, or a 9-channel inpainting UNet), and an optional
per-step *hook* (blended inpainting with a plain UNet), all handed to :func:`fullrange.sample` at once.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import MAX_SEED, ConfigError, check_choice, check_finite, check_range, setting
from ..denoiser import map_cond
from ..guidance import CFG_PP_SAMPLERS, Shaping
from ..images import read_image, save_new_png, tile, to_uint8
from ..prediction import add_noise
from ..samplers import SAMPLERS, Callback, Hook
from ..sampling import DEFAULT_SAMPLER, default_rescale, pick, sample
from ..timesteps import LADDERS, SPACINGS
from .model import StableDiffusion
from .tone import leak_for, parse_tone

TONE_SOURCES = ("tone", "tone_image", "tone_stats")
OUT_OF_RANGE = ("control_scale", "guidance", "guidance_rescale", *TONE_SOURCES)
"""Settings whose extreme values drive a model out of its range (named when the result is not finite)."""


@dataclass(frozen=True)
class SampleSettings:
    """How to sample. ``sampler`` / ``spacing`` ``None`` take what :func:`fullrange.sampling.pick` picks,
    ``guidance_rescale`` ``None`` :func:`fullrange.sampling.default_rescale`, ``resolution`` ``None`` the UNet's.
    ``image``: img2img from that file, starting at the step ``strength`` picks as diffusers does (the last
    ``int(steps · strength)`` steps, at least one). ``control_image``: the ControlNet's condition, with
    ``control_scale``. ``mask``: inpaint ``image`` where the mask is white. At most one of ``tone`` (a brightness or
    #rrggbb colour), ``tone_image`` and ``tone_stats`` (files) sets the starting latent's leak
    (:mod:`fullrange.sd.tone`)."""

    sampler: str | None = setting(
        None, "Any of fullrange's samplers: " + ", ".join(SAMPLERS) + ".", shown="ddim, see the README"
    )
    steps: int = setting(25, "Sample steps.")
    spacing: str | None = setting(
        None,
        "leading, linspace, trailing, karras or exponential.",
        shown="trailing",
    )
    guidance: float = setting(7.5, "Classifier-free guidance scale.")
    guidance_rescale: float | None = setting(
        None, "Guidance rescale φ (Lin et al.) against over-exposure.", shown="0.7 at zero terminal SNR, else 0"
    )
    guidance_interval: tuple[float, ...] = setting(
        (),
        "Guide only where lo < σ <= hi (Kynkäänniemi et al. 2024): give it twice, lo then hi.",
        shown="every step",
    )
    guidance_low: float | None = setting(
        None,
        "Frequency-decoupled guidance: the scale of the lowest 3×3 frequencies (brightness, colour cast).",
        shown="`guidance`",
    )
    apg_eta: float = setting(
        1.0, "APG (Sadat et al. 2025): weight of the guidance's part along the conditional prediction (0 drops it)."
    )
    apg_norm_threshold: float = setting(0.0, "APG: clamp the guidance term's norm to this (0: no clamp).")
    apg_momentum: float = setting(0.0, "APG: momentum of the guidance term across steps, e.g. -0.5 (0: none).")
    cfg_zero_star: bool = setting(False, "CFG-Zero* (Fan et al. 2025): fit the negative branch's scale to the other.")
    cfg_zero_init: int = setting(0, "CFG-Zero*: the first N steps predict zero flow velocity, without the model.")
    cfg_pp: bool = setting(
        False, "CFG++ (Chung et al. 2025), `guidance` being its λ in [0, 1]: ddim and euler re-noise unconditionally."
    )
    seed: int = setting(0, "Seed of the first image; image i uses seed + i.")
    resolution: int | None = setting(None, "Image side in pixels, a multiple of 8.", shown="the UNet's")
    width: int | None = setting(None, "Image width in pixels, a multiple of 8.", shown="`resolution`")
    height: int | None = setting(None, "Image height in pixels, a multiple of 8.", shown="`resolution`")
    negative_prompt: str = setting("", "Negative prompt (the unconditional branch of guidance).")
    tone: str | None = setting(
        None, "Start from this brightness (0 black … 1 white) or colour (#1a1a1a): works on any model (signal leak)."
    )
    tone_image: str | None = setting(None, "Start from the lowest frequencies of this image's latent (tones, layout).")
    tone_stats: str | None = setting(None, "Start from tones drawn per image from a file of fullrange tone-stats.")
    image: str | None = setting(None, "img2img: start from this image, noised as `strength` says.")
    strength: float = setting(
        1.0, "img2img: how much of the ladder to run, 0 < s <= 1 (1 at zero terminal SNR: from pure noise)."
    )
    control_image: str | None = setting(None, "The ControlNet's condition image (edges, depth, ...).")
    control_scale: float = setting(1.0, "How strongly the ControlNet's residuals are added.")
    mask: str | None = setting(
        None,
        "Inpainting: repaint `image` where this mask is white (an inpainting UNet of 9 channels, or any UNet, blended "
        "back after every step).",
    )

    def __post_init__(self) -> None:
        check_finite(self)
        sources = [name for name in TONE_SOURCES if getattr(self, name) is not None]
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
        if self.guidance_rescale is not None:
            check_range("guidance_rescale", self.guidance_rescale, 0, 1)
        if self.guidance_interval and (
            len(self.guidance_interval) != 2 or not 0 <= self.guidance_interval[0] < self.guidance_interval[1]
        ):
            raise ConfigError("guidance_interval", f"takes lo then hi with 0 <= lo < hi, got {self.guidance_interval}")
        check_range("apg_norm_threshold", self.apg_norm_threshold, 0)
        check_range("cfg_zero_init", self.cfg_zero_init, 0)
        if self.cfg_pp:
            check_range("guidance", self.guidance, 0, 1)
            if (self.sampler or DEFAULT_SAMPLER) not in CFG_PP_SAMPLERS:
                raise ConfigError("cfg_pp", f"needs --sampler {' or '.join(CFG_PP_SAMPLERS)} (its update is theirs)")
        check_range("seed", self.seed, 0)
        check_range("seed", self.seed, None, MAX_SEED)
        for name in ("resolution", "width", "height"):
            side = getattr(self, name)
            if side is not None and (side <= 0 or side % 8):
                raise ConfigError(name, f"must be a positive multiple of 8, got {side}")

    @property
    def shaping(self) -> Shaping:
        """How the guidance term is shaped (:class:`fullrange.guidance.Shaping`)."""
        interval = tuple(self.guidance_interval) if self.guidance_interval else (0.0, math.inf)
        return Shaping(
            interval=interval,
            zero_star=self.cfg_zero_star,
            momentum=self.apg_momentum,
            norm_threshold=self.apg_norm_threshold,
            eta=self.apg_eta,
            low_scale=self.guidance_low,
            zero_init=self.cfg_zero_init,
            cfg_pp=self.cfg_pp,
        )


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


def resolve(model: StableDiffusion, settings: SampleSettings) -> tuple[SampleSettings, str]:
    """The settings sampling actually uses: the sampler and spacing :func:`~fullrange.sampling.pick` picks where
    none is given, the guidance rescale of :func:`~fullrange.sampling.default_rescale`, and the UNet's own resolution
    (the width and height where they are not given); with the note saying what was picked (``""`` if nothing)."""
    resolution = settings.resolution or model.unet.config.sample_size * model.vae_scale_factor
    width, height = settings.width or resolution, settings.height or resolution
    sampler, spacing, note = pick(model.spec, settings.sampler, settings.spacing)
    effective = {"sampler": sampler, "spacing": spacing, "resolution": resolution, "width": width, "height": height}
    if settings.guidance_rescale is None:
        effective["guidance_rescale"] = phi = default_rescale(model.spec, settings.shaping)
        if phi and settings.guidance != 1:
            note = "; ".join(filter(None, [note, f"guidance rescale {phi:g} at zero terminal SNR"]))
    return replace(settings, **effective), note


def pixel_mask(path: str, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, H, W) booleans at pixel ``size`` (width, height): where the mask file is white (binarised at 0.5), to
    repaint."""
    return (read_image(path, size, "mask")[None].mean(1, keepdim=True) + 1) / 2 >= 0.5


def latent_mask(binary: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, h, w): a pixel mask at latent ``size`` (h, w), nearest, as diffusers' inpainting pipeline resizes it."""
    return torch.nn.functional.interpolate(binary.float(), size=size)


def inpaint_channels(model: StableDiffusion, image: str, mask: str, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + C, h, w): the mask at latent size (white = repaint) and the latents of the image with the repainted
    part blacked out, as diffusers' inpainting pipeline builds them for a 9-channel UNet; ``size`` (width, height)
    in pixels."""
    binary = pixel_mask(mask, size)
    masked, _ = model.encode_images(read_image(image, size, "image")[None] * ~binary)
    return torch.cat([latent_mask(binary, tuple(masked.shape[-2:])), masked], dim=1)


def _start(model: StableDiffusion, settings: SampleSettings, noise: torch.Tensor, steps: torch.Tensor, seeds: list):
    """Where sampling starts, as ``(x, steps, leak, image)``: pure noise (with a tone's ``leak`` for the first
    step, if a tone is set), or img2img's image latents noised to the step ``strength`` picks, the steps before it
    dropped. Inpainting at strength 1 starts from pure noise, as diffusers'."""
    if settings.image is None:
        tones = {name: getattr(settings, name) for name in TONE_SOURCES}
        return noise, steps, leak_for(model, tuple(noise.shape[-2:]), seeds, **tones), None
    begin = min(settings.steps - int(settings.steps * settings.strength), settings.steps - 1)
    steps = steps[begin:]
    image, _ = model.encode_images(read_image(settings.image, _size(settings), "image")[None])
    if settings.mask is not None and settings.strength == 1:
        return noise, steps, None, image
    alpha_cumprod = float(model.spec.schedule.alphas_cumprod_at(steps[:1].double())[0])
    return add_noise(image, noise, alpha_cumprod), steps, None, image


def _network(model: StableDiffusion, settings: SampleSettings, controlnet: torch.nn.Module | None, n: int):
    """The network sampled and what it takes besides the prompt's conditioning, in both guidance branches: the
    UNet; a UNet with a ControlNet and its condition image; or a 9-channel inpainting UNet and its extra channels."""
    unet, device = model.unet, model.unet.device
    if controlnet is not None:
        if settings.control_image is None:
            raise ConfigError("control_image", "is needed with a ControlNet")
        control = (read_image(settings.control_image, _size(settings), "control_image")[None] + 1) / 2
        return ControlledUNet(unet, controlnet, settings.control_scale), {
            "controlnet_cond": control.expand(n, -1, -1, -1).to(device, unet.dtype)
        }
    if _is_inpainting(model):
        if settings.mask is None:
            raise ConfigError(
                "mask",
                "is needed: this UNet inpaints (it takes the latents, a mask and a masked image); give image and mask",
            )
        extra = inpaint_channels(model, settings.image, settings.mask, _size(settings)).expand(n, -1, -1, -1)
        return InpaintingUNet(unet), {"inpaint_channels": extra.to(device, unet.dtype)}
    return unet, {}


def _is_inpainting(model: StableDiffusion) -> bool:
    """Whether the UNet takes the mask and the masked image's latents besides the noisy latents (9 channels for SD)."""
    return model.unet.config.in_channels == 2 * model.vae.config.latent_channels + 1


def _blend(model: StableDiffusion, settings: SampleSettings, image: torch.Tensor, noise: torch.Tensor) -> Hook:
    """Blended inpainting with a plain UNet, as diffusers' inpainting pipeline does it: after every step the part
    outside the mask is replaced by the image noised to the point the step reached (the image itself at ᾱ = 1)."""
    channels = model.vae.config.latent_channels
    if model.unet.config.in_channels != channels:
        raise ConfigError("mask", f"a UNet of {model.unet.config.in_channels} input channels cannot inpaint")
    device = model.unet.device
    mask = latent_mask(pixel_mask(settings.mask, _size(settings)), tuple(noise.shape[-2:])).to(device)
    image, noise = image.to(device), noise.to(device)

    def hook(x: torch.Tensor, alpha_cumprod: float) -> torch.Tensor:
        return mask * x + (1 - mask) * add_noise(image, noise, alpha_cumprod)

    return hook


@torch.no_grad()
def generate(
    model: StableDiffusion,
    prompts: list[str],
    settings: SampleSettings,
    callback: Callback | None = None,
    controlnet: torch.nn.Module | None = None,
    seeds: list[int] | None = None,
) -> torch.Tensor:
    """Images in [0, 1], shape (N, 3, H, W), one per prompt, image i from the noise of ``seeds[i]`` (default
    ``seed + i``), as ``settings`` say (start, network and hook: the module docstring); float32 on the CPU."""
    settings, note = resolve(model, settings)
    if note:
        logging.getLogger("fullrange").info(note)
    n, f = len(prompts), model.vae_scale_factor
    seeds = [settings.seed + i for i in range(n)] if seeds is None else list(seeds)
    noise = seeded_noise((model.vae.config.latent_channels, settings.height // f, settings.width // f), seeds)
    steps = model.spec.plan(settings.steps, settings.spacing, num_values=math.prod(noise.shape[1:]))
    start, steps, leak, image = _start(model, settings, noise, steps, seeds)
    network, extra = _network(model, settings, controlnet, n)
    hook = _blend(model, settings, image, noise) if settings.mask is not None and network is model.unet else None
    cond, uncond = _conditions(model, prompts, settings.negative_prompt, _size(settings))
    device = model.unet.device
    latents = sample(
        network,
        start.to(device),
        model.spec,
        sampler=settings.sampler,
        steps=steps,
        cond=map_cond(lambda v: v.to(device), cond) | extra,
        uncond=map_cond(lambda v: v.to(device), uncond) | extra,
        guidance_scale=settings.guidance,
        guidance_rescale=settings.guidance_rescale,
        shaping=settings.shaping,
        callback=callback,
        hook=hook,
        generator=torch.Generator().manual_seed(settings.seed),
        leak=None if leak is None else leak.to(device),
    )
    try:
        return model.decode_latents(latents)
    except ValueError as err:
        defaults = {f.name: f.default for f in fields(SampleSettings)}
        given = [f"`{name}`" for name in OUT_OF_RANGE if getattr(settings, name) != defaults[name]]
        suspects = ", ".join([*given, "`adapter_strength`"])
        raise ValueError(f"{err}: the model was driven out of its range; check {suspects}") from None


def seeded_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, sample i drawn from its own generator seeded ``seeds[i]``: an image
    keeps its noise whatever the batch it is sampled in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])


def _size(settings: SampleSettings) -> tuple[int, int]:
    """(width, height) in pixels of resolved settings."""
    return settings.width, settings.height


def _conditions(model: StableDiffusion, prompts: list[str], negative_prompt: str, size: tuple[int, int]):
    """The UNet's conditioning of ``prompts`` and of the negative prompt (SDXL's empty one is zeros, diffusers'
    default), with SDXL's size conditioning for images of ``size`` (width, height) pixels."""
    height_width = size[::-1]
    time_ids = model.time_ids(height_width, (0, 0), height_width)
    time_ids = None if time_ids is None else time_ids.expand(len(prompts), -1)
    text = model.encode_prompts(prompts)
    if model.is_xl and not negative_prompt:
        negative = {k: torch.zeros_like(v) for k, v in text.items()}
    else:
        negative = model.encode_prompts([negative_prompt] * len(prompts))
    return model.condition(text, time_ids), model.condition(negative, time_ids)


def save_images(
    images: torch.Tensor,
    prompts: list[str],
    settings: SampleSettings,
    out: Path,
    source: dict | None = None,
    seeds: list[int] | None = None,
) -> list[Path]:
    """One PNG per image, named by its seed (``seeds[i]``, default ``settings.seed + i``) and a slug of its prompt,
    with a ``fullrange`` text chunk (JSON: prompt, seed, ``settings`` and ``source``: what made it, see
    :mod:`fullrange.sd.pnginfo`) and A1111's ``parameters`` text. Written atomically, and nothing is overwritten: a
    name already taken gets ``-2``, ``-3``, ... Returns the paths."""
    from .pnginfo import text_chunks

    seeds = [settings.seed + i for i in range(len(prompts))] if seeds is None else seeds
    return [
        save_new_png(out, f"{seed:06d}-{_slug(prompt)}", array, text_chunks(settings, seed, prompt, source))
        for array, prompt, seed in zip(to_uint8(images), prompts, seeds, strict=True)
    ]


def save_grid(images: torch.Tensor, out: Path, seed: int, columns: int = 4) -> Path:
    """All ``images`` (in [0, 1]) as one PNG grid, ``grid-SEED.png`` (never overwriting: ``-2``, ... if taken)."""
    return save_new_png(out, f"grid-{seed:06d}", tile(to_uint8(images), columns=columns))


def sample_to_folder(
    model: StableDiffusion,
    prompts: list[str],
    settings: SampleSettings,
    out: Path,
    *,
    num_images: int = 1,
    batch_size: int = 1,
    same_seed: bool = False,
    controlnet: torch.nn.Module | None = None,
    source: dict | None = None,
    progress: bool = True,
) -> tuple[list[Path], Path]:
    """Every prompt ``num_images`` times, sampled ``batch_size`` at a time, into ``out``: one PNG per image with the
    settings it was sampled with (:func:`save_images`) and a grid of all. Image i of the run has seed
    ``settings.seed + i`` whatever the batch; with ``same_seed``, image j of every prompt has ``settings.seed + j``,
    so prompts are compared on the same noise. Returns the images' paths and the grid's."""
    check_counts(num_images, batch_size)
    effective, _ = resolve(model, settings)  # what the PNGs record: the sampler and spacing picked too
    all_prompts = [p for p in prompts for _ in range(num_images)]
    seeds = [settings.seed + (i % num_images if same_seed else i) for i in range(len(all_prompts))]
    paths, images = [], []
    total = settings.steps * math.ceil(len(all_prompts) / batch_size)
    with tqdm(total=total, desc="sample", disable=not progress) as bar:
        for first in range(0, len(all_prompts), batch_size):
            chunk, chunk_seeds = all_prompts[first : first + batch_size], seeds[first : first + batch_size]
            part = replace(settings, seed=chunk_seeds[0])  # the stochastic samplers' own draws
            batch = generate(model, chunk, part, lambda info: bar.update(1), controlnet, chunk_seeds)
            paths += save_images(batch, chunk, effective, out, source, chunk_seeds)
            images.append(batch)
    return paths, save_grid(torch.cat(images), out, settings.seed)


def check_counts(num_images: int, batch_size: int) -> None:
    """Images per prompt and per batch are positive (a ConfigError names the one that is not)."""
    check_range("num_images", num_images, 0, open_low=True)
    check_range("batch_size", batch_size, 0, open_low=True)


def _slug(prompt: str, length: int = 40) -> str:
    """``"A dark alley, in the rain!"`` → ``"a-dark-alley-in-the-rain"``; ``"image"`` when nothing is left."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:length].rstrip("-") or "image"
