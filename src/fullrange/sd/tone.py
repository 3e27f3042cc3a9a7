"""Where the leak of a Stable Diffusion sample comes from (:mod:`fullrange.leak`), in the latent space of the
model's own VAE: a brightness or colour (a solid image, encoded: no statistics needed), a reference image's lowest
DCT frequencies, or a folder's statistics (a :class:`~fullrange.leak.ToneStats` file, drawn per sample)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .. import data
from ..config import ConfigError
from ..files import save_safetensors
from ..images import load_image, read_image
from ..leak import BAND, ToneStats, from_low_frequencies, low_frequencies
from .model import StableDiffusion

K = BAND
STATS_FORMAT = "fullrange-tone-stats"
SEED_STREAM = 2**32
"""An image's leak is drawn with seed ``SEED_STREAM + seed``: a stream apart from its noise's (``seed``)."""
HEX = re.compile(r"#?([0-9a-fA-F]{6})")


def parse_tone(text: str) -> tuple[float, float, float]:
    """``"0.05"`` (a brightness in [0, 1], grey) or ``"#1a1a1a"`` (an sRGB colour) as RGB in [0, 1]."""
    if match := HEX.fullmatch(text.strip()):
        value = int(match.group(1), 16)
        return tuple(((value >> shift) & 255) / 255 for shift in (16, 8, 0))
    try:
        level = float(text)
    except ValueError:
        level = float("nan")
    if not 0 <= level <= 1:  # also refuses nan
        raise ConfigError("tone", f"{text!r} is neither a brightness in [0, 1] nor a colour like #1a1a1a")
    return (level,) * 3


def colour_leak(model: StableDiffusion, rgb: tuple[float, float, float]) -> torch.Tensor:
    """(1, C, 1, 1): the per-channel mean of the latent of a solid image of colour ``rgb`` (in [0, 1])."""
    side = 8 * model.vae_scale_factor
    pixels = (torch.tensor(rgb).view(1, 3, 1, 1) * 2 - 1).expand(1, 3, side, side)
    return model.encode_images(pixels)[0].mean((-2, -1), keepdim=True)


def image_leak(model: StableDiffusion, path: Path | str, size: tuple[int, int], k: int = K) -> torch.Tensor:
    """(1, C, h, w): the ``k × k`` lowest DCT frequencies of the latent of the image at ``path``, fitted (cover,
    centre crop) to a latent of ``size`` (h, w)."""
    factor = model.vae_scale_factor
    pixels = read_image(path, (size[1] * factor, size[0] * factor), "tone_image")
    latent, _ = model.encode_images(pixels.unsqueeze(0))
    return from_low_frequencies(low_frequencies(latent.double(), k), size).float()


def fit_stats(
    model: StableDiffusion, folder: Path | str, resolution: int, k: int = K, progress: bool = True
) -> tuple[ToneStats, int, list[data.Problem]]:
    """The joint Gaussian of the lowest DCT coefficients of the latents of the images in ``folder`` at
    ``resolution`` pixels (captions are not needed), the number of images it was fitted to, and the images
    skipped, with their reasons."""
    if resolution <= 0 or resolution % model.vae_scale_factor:
        raise ConfigError("resolution", f"must be a positive multiple of {model.vae_scale_factor}, got {resolution}")
    try:
        items, problems = data.scan(folder, min_size=1, default_caption="(captions are not used)")
    except data.DataError as err:
        raise ConfigError("data", str(err)) from None
    coefficients = [
        low_frequencies(model.encode_images(load_image(item.path, resolution).unsqueeze(0))[0].double(), k)
        for item in tqdm(items, desc="encode images", disable=not progress)
    ]
    return ToneStats.from_coefficients(torch.cat(coefficients)), len(items), problems


def save_stats(path: Path | str, stats: ToneStats, model: StableDiffusion, count: int) -> None:
    """Atomically, as safetensors: ``mean`` and ``covariance``, with the format, k, channels, image count and the
    model they were measured on in the metadata."""
    metadata = {
        "format": STATS_FORMAT,
        "k": str(stats.k),
        "channels": str(stats.channels),
        "images": str(count),
        "model": str(model.source),
    }
    save_safetensors(path, {"mean": stats.mean.contiguous(), "covariance": stats.covariance.contiguous()}, metadata)


def load_stats(path: Path | str) -> ToneStats:
    """A file written by :func:`save_stats`; errors name the file (as ``tone_stats``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError("tone_stats", f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
        if meta.get("format") != STATS_FORMAT:
            raise ValueError("not a tone statistics file (write one with fullrange tone-stats)")
        return ToneStats(tensors["mean"], tensors["covariance"], int(meta["channels"]), int(meta["k"]))
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        detail = err if isinstance(err, ValueError) else f"unreadable ({type(err).__name__})"
        raise ConfigError("tone_stats", f"{path}: {detail}") from None


def leak_for(
    model: StableDiffusion,
    size: tuple[int, int],
    seeds: list[int],
    *,
    tone: str | None = None,
    tone_image: str | None = None,
    tone_stats: str | None = None,
) -> torch.Tensor | None:
    """The leaks of samples of latent ``size`` (h, w) and noise ``seeds`` from whichever source is given (at most one),
    or ``None``; drawn from tone statistics, sample i's leak comes from its own stream, ``SEED_STREAM + seeds[i]``."""
    if tone is not None:
        return colour_leak(model, parse_tone(tone))
    if tone_image is not None:
        return image_leak(model, tone_image, size)
    if tone_stats is None:
        return None
    stats = load_stats(tone_stats)
    channels = model.unet.config.in_channels
    if stats.channels != channels:
        raise ConfigError(
            "tone_stats", f"{tone_stats}: statistics of {stats.channels} latent channels; this model has {channels}"
        )
    draws = [stats.draw(1, size, torch.Generator().manual_seed(SEED_STREAM + seed)) for seed in seeds]
    return torch.cat(draws).float()
