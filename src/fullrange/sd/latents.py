"""From an image folder to training batches: VAE latents and caption states, cached on disk, drawn in batches
(square or by aspect-ratio bucket) with caption dropout and SDXL's size conditioning.

Cache entries are written atomically and checked when read (readable, the expected tensors and shapes, finite);
a damaged one is encoded again and replaced."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .. import data
from ..batches import Batch, Batches, one_of
from ..files import save_safetensors
from ..images import cover_crop, load_image
from .config import DataConfig
from .load import inference_device
from .model import StableDiffusion


def model_id(model: StableDiffusion) -> str:
    """Identifies the VAE and text encoders whose outputs are cached (their weight files' names, sizes, times; the
    single file's for a single-file checkpoint)."""
    digest = hashlib.sha256()
    if model.source.is_file():
        files = [model.source]
    else:
        parts = ("vae", "text_encoder", "text_encoder_2")
        files = [p for c in parts for p in sorted((model.source / c).glob("*.safetensors"))]
    for path in files:
        digest.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_latents(
    model: StableDiffusion, items: list[data.Item], size: int | tuple[int, int], cache: Path, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of the VAE latents of every image at ``size`` (side or (width, height)), in the UNet's
    units (:meth:`~fullrange.sd.model.StableDiffusion.encode_images`), from ``cache`` where already encoded. The
    VAE is moved to this process's device when an image must be encoded, never when all are cached."""
    key = f"{model_id(model)}:scaled"  # entries of an older layout (unscaled) are not read as these
    width, height = (size, size) if isinstance(size, int) else size
    factor = model.vae_scale_factor
    shape = (model.vae.config.latent_channels, height // factor, width // factor)
    means, stds = [], []
    for item in tqdm(items, desc="encode images", disable=not progress):
        path = cache / f"latent_{data.cache_key(item.path, key, size)}.safetensors"
        stored = _cached(path, {"mean": shape, "std": shape})
        if stored is None:
            model.vae.to(inference_device())
            mean, std = model.encode_images(load_image(item.path, size).unsqueeze(0))
            stored = {"mean": mean[0], "std": std[0]}
            save_safetensors(path, stored)
        means.append(stored["mean"])
        stds.append(stored["std"])
    return torch.stack(means), torch.stack(stds)


@torch.no_grad()
def encode_captions(model: StableDiffusion, captions: list[str], cache: Path) -> dict[str, torch.Tensor]:
    """Text states of ``captions`` followed by the empty caption's, from ``cache`` when seen before (else encoded on
    this process's device)."""
    texts = [*captions, ""]
    key = hashlib.sha256(json.dumps([model_id(model), texts]).encode()).hexdigest()[:32]
    path = cache / f"text_{key}.safetensors"
    stored = _cached(path, None)
    if stored is not None and all(v.shape[0] == len(texts) for v in stored.values()):
        return stored
    for encoder in model.text_encoders.values():
        encoder.to(inference_device())
    states = {k: v.float().cpu().contiguous() for k, v in model.encode_prompts(texts).items()}
    save_safetensors(path, states)
    return states


def _cached(path: Path, shapes: dict[str, tuple[int, ...]] | None) -> dict[str, torch.Tensor] | None:
    """The cache entry at ``path`` if it is there, readable, finite and holds exactly ``shapes`` (any shapes if
    ``None``); ``None`` otherwise (missing or damaged: the caller encodes it again)."""
    if not path.is_file():
        return None
    try:
        stored = load_file(path)
    except (SafetensorError, OSError, ValueError):
        return None
    if not stored or (shapes is not None and {k: tuple(v.shape) for k, v in stored.items()} != shapes):
        return None
    return stored if all(bool(v.isfinite().all()) for v in stored.values()) else None


def latent_batches(
    model: StableDiffusion,
    means: torch.Tensor,
    stds: torch.Tensor,
    captions: list[str],
    dropout: float,
    cache: Path,
    time_ids: torch.Tensor | None = None,
    token_ids: bool = False,
    repeats: list[int] | None = None,
) -> Batches:
    """Batches of VAE latents (a fresh posterior draw) with their captions' UNet
    conditioning, each caption replaced by the empty one with probability ``dropout``; ``time_ids``: per-image
    size conditioning (SDXL). With ``token_ids`` the captions are given as token ids for
    :class:`~fullrange.sd.model.TextConditionedUNet` (when the text encoders train), else as the encoders'
    cached states; ``repeats``: how often each image is drawn relative to the others."""
    if token_ids:
        texts = {k: v.cpu() for k, v in model.tokenize([*captions, ""]).items()}
    else:
        texts = encode_captions(model, captions, cache)

    weights = None if repeats is None or set(repeats) == {1} else torch.tensor(repeats, dtype=torch.float64)

    def draw(batch_size: int, generator: torch.Generator) -> Batch:
        # Images drawn uniformly, or in proportion to their repeats (kohya's N_name folders): over many draws an image
        # of N repeats is seen N times as often, as in an epoch that shows it N times.
        if weights is None:
            index = torch.randint(0, means.shape[0], (batch_size,), generator=generator)
        else:
            index = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        z = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        drop = torch.rand(batch_size, generator=generator) < dropout
        text = {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), v[-1:], v[:-1][index]) for k, v in texts.items()}
        sizes = None if time_ids is None else time_ids[index]
        if token_ids:
            return Batch(z, text | ({} if sizes is None else {"time_ids": sizes}))
        return Batch(z, model.condition(text, sizes))

    return draw


def bucket_step(model: StableDiffusion) -> int:
    """Bucket sides are multiples of this: the VAE's factor times the UNet's total downsampling (64 for SD)."""
    return model.vae_scale_factor * 2 ** (len(model.unet.config.block_out_channels) - 1)


def image_batches(
    model: StableDiffusion,
    items: list[data.Item],
    config: DataConfig,
    cache: Path,
    progress: bool,
    token_ids: bool = False,
) -> Batches:
    """Batches of an image folder: square at ``config.resolution``, or with ``config.buckets`` one aspect-ratio
    bucket per batch, buckets drawn in proportion to their images; captions as :func:`latent_batches` says."""
    if not config.buckets:
        sizes = [config.resolution] * len(items)
    else:
        choices = data.buckets(config.resolution, step=bucket_step(model))
        sizes = [data.nearest_bucket(*item.size, choices) for item in items]
    sources = []
    for size in dict.fromkeys(sizes):
        group = [item for item, s in zip(items, sizes, strict=True) if s == size]
        means, stds = encode_latents(model, group, size, cache, progress)
        target = (size, size) if isinstance(size, int) else size
        ids = [model.time_ids(i.size[::-1], cover_crop(i.size, target)[1][::-1], target[::-1]) for i in group]
        time_ids = torch.stack(ids) if model.is_xl else None
        captions, repeats = [i.caption for i in group], [i.repeats for i in group]
        dropout = config.caption_dropout
        draw = latent_batches(model, means, stds, captions, dropout, cache, time_ids, token_ids, repeats)
        sources.append((draw, sum(repeats)))
    return sources[0][0] if len(sources) == 1 else one_of(sources)
