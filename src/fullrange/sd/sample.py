"""Sample Stable Diffusion with fullrange's samplers and guidance, as its spec says; PNGs carry their settings."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import ConfigError, check_choice, check_finite, check_range
from ..denoiser import map_cond
from ..images import tile
from ..samplers import SAMPLERS
from ..sampling import sample
from ..timesteps import LADDERS, SPACINGS
from .model import StableDiffusion
from .tone import leak_for, parse_tone


@dataclass(frozen=True)
class SampleSettings:
    """How to sample: ``sampler`` / ``spacing`` ``None`` take what :func:`fullrange.sampling.pick` picks for the latent
    size; ``resolution`` ``None`` the UNet's.
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

    def __post_init__(self) -> None:
        check_finite(self)
        sources = [name for name in ("tone", "tone_image", "tone_stats") if getattr(self, name) is not None]
        if len(sources) > 1:
            raise ConfigError(sources[1], "is a second source of tone: give only one")
        if self.tone is not None:
            parse_tone(self.tone)
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


@torch.no_grad()
def generate(model: StableDiffusion, prompts: list[str], settings: SampleSettings, callback=None) -> torch.Tensor:
    """Images in [0, 1], shape (N, 3, H, W), one per prompt, seeds ``seed + i``; on the UNet's device. A tone in
    ``settings`` starts every sample from its leak (the same noise as without)."""
    size = (settings.resolution or model.unet.config.sample_size * model.vae_scale_factor) // model.vae_scale_factor
    channels = model.unet.config.in_channels
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
    latents = sample(
        model.unet,
        noise.to(device),
        model.spec,
        sampler=settings.sampler,
        steps=settings.steps,
        spacing=settings.spacing,
        cond=map_cond(to_device, model.condition(text, time_ids)),
        uncond=map_cond(to_device, model.condition(negative, time_ids)),
        guidance_scale=settings.guidance,
        guidance_rescale=settings.guidance_rescale,
        callback=callback,
        generator=torch.Generator().manual_seed(settings.seed),
        leak=None if leak is None else leak.to(device),
    )
    latents = latents.to(model.vae.device, model.vae.dtype) / model.vae.config.scaling_factor
    images = model.vae.decode(latents).sample
    return ((images.float().cpu() + 1) / 2).clamp(0, 1)


def save_images(
    images: torch.Tensor, prompts: list[str], settings: SampleSettings, out: Path
) -> tuple[list[Path], Path]:
    """One PNG per image, named by its seed and a slug of its prompt, with the prompt and settings in a
    ``fullrange`` text chunk; and a grid of them all. Nothing is overwritten: a name already taken gets ``-2``,
    ``-3``, ... Returns the images' paths and the grid's."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (array, prompt) in enumerate(zip(arrays, prompts, strict=True)):
        info = PngInfo()
        info.add_text("fullrange", json.dumps({"prompt": prompt, **asdict(settings), "seed": settings.seed + i}))
        path, f = _new_file(out, f"{settings.seed + i:06d}-{_slug(prompt)}")
        with f:
            Image.fromarray(array).save(f, format="PNG", pnginfo=info)
        paths.append(path)
    grid, f = _new_file(out, f"grid-{settings.seed:06d}")
    with f:
        Image.fromarray(tile(torch.from_numpy(arrays).permute(0, 3, 1, 2), columns=4).numpy()).save(f, format="PNG")
    return paths, grid


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
